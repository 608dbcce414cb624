"""Users, organisations, tokens and who may read or write what: whoami-v2 and the permission checks."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .server import Answer, HubError, Request

if TYPE_CHECKING:
    from .server import HubServer

WRITE_ORG_ROLES = frozenset({"admin", "write", "contributor"})
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def oid24(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()[:24]


@dataclass
class Token:
    user: str
    role: str  # "read" | "write" | "fineGrained" (whoami-v2's auth.accessToken.role), or "oauth" (oauth.py)
    display_name: str
    scoped: dict[str, list[str]] = field(default_factory=dict)  # entity (user, org or repo id) -> permissions
    scopes: frozenset[str] = frozenset()  # an OAuth token's granted scopes
    expires_at: float | None = None  # an OAuth token's expiry


@dataclass
class User:
    name: str
    orgs: dict[str, str] = field(default_factory=dict)  # org name -> roleInOrg


class Auth:
    """The account side of the Hub; `member` / `can_write` / `can_read_private` are what repos and LFS ask."""

    def __init__(self, server: HubServer) -> None:
        self.server = server
        self.users: dict[str, User] = {}
        self.tokens: dict[str, Token] = {}
        self.orgs: set[str] = set()
        server.add_route("GET", "/api/whoami-v2", self._whoami)

    def add_user(
        self, name: str, token: str, can_write: bool = True, orgs: Iterable[str] | Mapping[str, str] = ()
    ) -> None:
        roles = dict(orgs) if isinstance(orgs, Mapping) else {org: "write" for org in orgs}
        user = self.users.setdefault(name, User(name))
        user.orgs.update(roles)
        self.orgs.update(roles)
        self.add_token(name, token, role="write" if can_write else "read")

    def add_token(
        self, user: str, token: str, *, role: str = "write", scoped: Mapping[str, Iterable[str]] | None = None
    ) -> None:
        if role not in ("read", "write", "fineGrained"):
            raise ValueError(f"unknown token role {role!r}")
        if user not in self.users:
            raise KeyError(f"unknown user {user!r}: call add_user first")
        self.tokens[token] = Token(
            user=user,
            role=role,
            display_name=f"{user}-{role}-{len(self.tokens)}",
            scoped={entity: list(perms) for entity, perms in (scoped or {}).items()},
        )

    def add_oauth_token(
        self, user: str, token: str, scopes: Iterable[str], display_name: str, expires_at: float
    ) -> None:
        """An access token issued by the OAuth token endpoint (tests/loopback_hub/oauth.py)."""
        if user not in self.users:
            raise KeyError(f"unknown user {user!r}: call add_user first")
        self.tokens[token] = Token(user, "oauth", display_name, scopes=frozenset(scopes), expires_at=expires_at)

    def from_header(self, authorization: str | None) -> Token | None:
        if not authorization:
            return None
        scheme, _, value = authorization.partition(" ")
        token = self.tokens.get(value.strip()) if scheme.lower() == "bearer" else None
        if token is None or (token.expires_at is not None and token.expires_at < time.time()):
            raise HubError(401, INVALID_CREDENTIALS)
        return token

    # ------------------------------------------------------------------ permissions

    def member(self, user: str, namespace: str, roles: frozenset[str] | None = None) -> bool:
        if namespace == user:
            return True
        role = self.users[user].orgs.get(namespace)
        return role is not None and (roles is None or role in roles)

    def can_write(
        self, token: Token | None, namespace: str, repo_id: str | None = None, *, create: bool = False
    ) -> bool:
        """Whether `token` may write into (or with `create`, create) a repo under `namespace`."""
        if token is None or not self.member(token.user, namespace, WRITE_ORG_ROLES):
            return False
        if token.role == "oauth":
            # The Hub's OAuth scopes: write-repos to push to the user's repos, manage-repos to create them.
            return "write-repos" in token.scopes and (not create or "manage-repos" in token.scopes)
        if token.role == "fineGrained":
            return "repo.write" in token.scoped.get(namespace, []) or (
                repo_id is not None and "repo.write" in token.scoped.get(repo_id, [])
            )
        return token.role == "write"

    def can_read_private(self, token: Token | None, namespace: str, repo_id: str) -> bool:
        if token is None or not self.member(token.user, namespace):
            return False
        if token.role == "fineGrained":
            perms = set(token.scoped.get(namespace, [])) | set(token.scoped.get(repo_id, []))
            return bool(perms & {"repo.content.read", "repo.write"})
        if token.role == "oauth":
            return bool(token.scopes & {"read-repos", "write-repos", "manage-repos"})
        return True

    # ------------------------------------------------------------------ endpoints

    def whoami_payload(self, token: Token) -> dict[str, Any]:
        user = self.users[token.user]
        if token.role == "oauth":
            # An OAuth token has no access-token record (huggingface_hub's login notes it has no displayName):
            # nothing in whoami says what it may write.
            auth: dict[str, Any] = {"type": "oauth", "expiresAt": iso(token.expires_at or 0)}
            return {**self._user_payload(user), "auth": auth}
        access: dict[str, Any] = {"displayName": token.display_name, "role": token.role, "createdAt": iso(0)}
        if token.role == "fineGrained":
            scoped = []
            for entity, perms in token.scoped.items():
                kind = "user" if entity in self.users else "org" if entity in self.orgs else "model"
                scoped.append({"entity": {"_id": oid24(entity), "type": kind, "name": entity}, "permissions": perms})
            access["fineGrained"] = {"canReadGatedRepos": True, "global": [], "scoped": scoped}
        return {**self._user_payload(user), "auth": {"type": "access_token", "accessToken": access}}

    def _user_payload(self, user: User) -> dict[str, Any]:
        return {
            "type": "user",
            "id": oid24(user.name),
            "name": user.name,
            "fullname": user.name.title(),
            "email": f"{user.name}@example.invalid",
            "emailVerified": True,
            "canPay": False,
            "isPro": False,
            "avatarUrl": "/avatars/default.svg",
            "orgs": [
                {
                    "type": "org",
                    "id": oid24(org),
                    "name": org,
                    "fullname": org,
                    "email": None,
                    "canPay": False,
                    "avatarUrl": "/avatars/default.svg",
                    "roleInOrg": role,
                    "isEnterprise": False,
                }
                for org, role in sorted(user.orgs.items())
            ],
        }

    def _whoami(self, req: Request) -> Answer:
        if req.token is None:
            raise HubError(401, INVALID_CREDENTIALS)
        return Answer.json(self.whoami_payload(req.token))
