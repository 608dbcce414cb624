"""A loopback Hugging Face Hub for tests: the real `huggingface_hub` client talks to it on 127.0.0.1.

It speaks the subset of the Hub API that `huggingface_hub` 2.4 uses for whoami, repo creation, repo info, tree
listing, preupload + ndjson commits and `/resolve` downloads, with the same request and response shapes (read
from the installed client: `hf_api.py`, `_commit_api.py`, `_upload_pipeline.py`, `file_download.py`,
`utils/_http.py`). Errors carry the `X-Error-Code` header that `hf_raise_for_status` maps to
`RepositoryNotFoundError`, `GatedRepoError`, `RevisionNotFoundError` and `RemoteEntryNotFoundError`.

Every file is stored as a regular git blob: preupload answers `uploadMode: "regular"` for all files, so the
client sends content inline in the commit and never opens an LFS or Xet transfer (both are only taken for
`uploadMode == "lfs"`), and `/resolve` never sends `X-Xet-Hash`, so downloads stay plain HTTP GETs.

    with LoopbackHub() as hub:
        hub.add_user("alice", "hf_alice_write", orgs=("acme",))
        hub.seed_repo("upstream/tiny", {"config.json": b"{}"}, gated=True)
        ...  # point HF_ENDPOINT / HfApi(endpoint=hub.endpoint) at hub.endpoint
        hub.repo_files("alice/out")  # {path: bytes} at the head of main

The server never logs tokens or headers (only method, path and status, at DEBUG), bounds request bodies and
socket idle time, and closes every open connection when stopped.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import itertools
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

log = logging.getLogger(__name__)

# The `.gitattributes` the Hub writes into every new model repo (abridged): a new repo is "empty" but for it.
DEFAULT_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pth filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    b"*.model filter=lfs diff=lfs merge=lfs -text\n"
    b"*tfevents* filter=lfs diff=lfs merge=lfs -text\n"
)
WRITE_ORG_ROLES = frozenset({"admin", "write", "contributor"})
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
_REPO_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_-])?$")
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1, which the Hub uses as `oid`, ETag and preupload `oid` of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class HubError(Exception):
    """An HTTP error answer: JSON body `{"error": message}` plus the `X-Error-*` headers the client reads."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.extra = extra
        self.headers: dict[str, str] = {}


@dataclass
class _Answer:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> _Answer:
        return cls(
            status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})}
        )


@dataclass
class _Token:
    user: str
    role: str  # "read" | "write" | "fineGrained", as in whoami-v2's auth.accessToken.role
    display_name: str
    scoped: dict[str, list[str]] = field(default_factory=dict)  # entity (user, org or repo id) -> permissions


@dataclass
class _User:
    name: str
    orgs: dict[str, str] = field(default_factory=dict)  # org name -> roleInOrg


@dataclass
class _Commit:
    oid: str
    parent: str | None
    title: str
    description: str
    files: dict[str, bytes]
    date: float


@dataclass
class _Repo:
    repo_id: str
    private: bool
    gated: bool
    created: float
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    granted: set[str] = field(default_factory=set)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/", 1)[0]


@dataclass
class _Failure:
    method: str
    pattern: re.Pattern[str]
    status: int
    remaining: int


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, hub: LoopbackHub) -> None:
        self.hub = hub
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keep-alive like the real Hub, so the client's pooled connections are exercised; every answer
    # carries Content-Length and every request body is read in full before answering.
    protocol_version = "HTTP/1.1"
    server_version = "LoopbackHub/1.0"
    timeout = 30  # idle keep-alive sockets are dropped instead of pinning a thread
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        # The request line never holds a token (the client sends it as a header); headers are never logged.
        log.debug("loopback hub: " + format, *args)

    def do_GET(self) -> None:
        self.server.hub._handle(self)

    do_HEAD = do_POST = do_DELETE = do_PUT = do_GET


class LoopbackHub:
    """In-memory Hugging Face Hub on a random loopback port, served from a background thread.

    Use as a context manager (or `start()` / `stop()`). Tests register users and tokens with `add_user` /
    `add_token`, publish source repos with `seed_repo`, and read what a client pushed with `repo_files`.
    `fail_next` makes the next matching requests answer an HTTP error, to test retries.
    """

    def __init__(self, *, tree_page_size: int = 1000, max_body_bytes: int = 256 * 2**20) -> None:
        self.tree_page_size = tree_page_size
        self.max_body_bytes = max_body_bytes
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self._lock = threading.RLock()
        self._users: dict[str, _User] = {}
        self._tokens: dict[str, _Token] = {}
        self._orgs: set[str] = set()
        self._repos: dict[str, _Repo] = {}
        self._failures: list[_Failure] = []
        self._counter = itertools.count()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("LoopbackHub is not running: call start() or use it as a context manager")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LoopbackHub:
        if self._server is None:
            self._server = _Server(self)
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name="loopback-hub",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        # Keep-alive connections would otherwise outlive the server and keep answering a pooled client.
        with server.connections_lock:
            open_connections = list(server.connections)
        for conn in open_connections:
            with contextlib.suppress(OSError):  # already closed by the client
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> LoopbackHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ test helpers

    def add_user(
        self,
        name: str,
        token: str,
        can_write: bool = True,
        orgs: Iterable[str] | Mapping[str, str] = (),
    ) -> None:
        """Register `name` with a classic token ("write" or "read") and org memberships.

        `orgs` is a list of org names (role "write") or a mapping org -> roleInOrg ("admin", "write",
        "contributor", "read").
        """
        roles = dict(orgs) if isinstance(orgs, Mapping) else {org: "write" for org in orgs}
        with self._lock:
            user = self._users.setdefault(name, _User(name))
            user.orgs.update(roles)
            self._orgs.update(roles)
        self.add_token(name, token, role="write" if can_write else "read")

    def add_token(
        self,
        user: str,
        token: str,
        *,
        role: str = "write",
        scoped: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        """Add a token for an existing user; `role="fineGrained"` takes `scoped` {entity: permissions}."""
        if role not in ("read", "write", "fineGrained"):
            raise ValueError(f"unknown token role {role!r}")
        with self._lock:
            if user not in self._users:
                raise KeyError(f"unknown user {user!r}: call add_user first")
            self._tokens[token] = _Token(
                user=user,
                role=role,
                display_name=f"{user}-{role}-{len(self._tokens)}",
                scoped={entity: list(perms) for entity, perms in (scoped or {}).items()},
            )

    def seed_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes | Path],
        gated: bool | None = None,
        private: bool | None = None,
        message: str = "seed",
    ) -> str:
        """Create (or add a commit to) a model repo directly in the store; returns the new head commit sha.

        `gated` / `private` default to False for a new repo and are left as they are for an existing one.
        """
        contents = {
            path: Path(v).read_bytes() if isinstance(v, Path) else bytes(v) for path, v in files.items()
        }
        with self._lock:
            repo = self._repos.get(repo_id)
            if repo is None:
                repo = self._new_repo(repo_id, private=bool(private))
            if gated is not None:
                repo.gated = gated
            if private is not None:
                repo.private = private
            head = repo.commits[repo.branches["main"]]
            return self._add_commit(repo, "main", message, "", {**head.files, **contents}, head.oid).oid

    def grant_access(self, repo_id: str, user: str) -> None:
        """Accept the licence of a gated repo on behalf of `user`."""
        with self._lock:
            self._repos[repo_id].granted.add(user)

    def repo_files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self._lock:
            repo = self._repos[repo_id]
            return dict(self._resolve(repo, revision).files)

    def repo_exists(self, repo_id: str) -> bool:
        with self._lock:
            return repo_id in self._repos

    def repo_private(self, repo_id: str) -> bool:
        with self._lock:
            return self._repos[repo_id].private

    def head(self, repo_id: str, branch: str = "main") -> str:
        with self._lock:
            return self._repos[repo_id].branches[branch]

    def commit_titles(self, repo_id: str, branch: str = "main") -> list[str]:
        """Commit titles from the head of `branch` back to the initial commit."""
        with self._lock:
            repo = self._repos[repo_id]
            titles, oid = [], repo.branches[branch]
            while oid is not None:
                commit = repo.commits[oid]
                titles.append(commit.title)
                oid = commit.parent
            return titles

    def fail_next(self, method: str, path_regex: str, status: int = 503, times: int = 1) -> None:
        """Answer the next `times` requests whose method and path match with `status` (to test retries)."""
        with self._lock:
            self._failures.append(_Failure(method.upper(), re.compile(path_regex), status, times))

    # ------------------------------------------------------------------ store internals

    def _new_repo(self, repo_id: str, *, private: bool) -> _Repo:
        repo = _Repo(repo_id=repo_id, private=private, gated=False, created=time.time())
        self._repos[repo_id] = repo
        self._add_commit(repo, "main", "initial commit", "", {".gitattributes": DEFAULT_GITATTRIBUTES}, None)
        return repo

    def _add_commit(
        self,
        repo: _Repo,
        branch: str,
        title: str,
        description: str,
        files: dict[str, bytes],
        parent: str | None,
    ) -> _Commit:
        seed = f"{repo.repo_id}\0{parent}\0{title}\0{next(self._counter)}\0{time.time_ns()}".encode()
        digest = hashlib.sha1(seed)
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + git_blob_oid(files[path]).encode())
        commit = _Commit(digest.hexdigest(), parent, title, description, files, time.time())
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    def _resolve(self, repo: _Repo, revision: str) -> _Commit:
        if revision in repo.branches:
            return repo.commits[repo.branches[revision]]
        if _COMMIT_SHA.match(revision) and revision in repo.commits:
            return repo.commits[revision]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    # ------------------------------------------------------------------ permissions

    def _member(self, user: str, namespace: str, roles: frozenset[str] | None = None) -> bool:
        if namespace == user:
            return True
        role = self._users[user].orgs.get(namespace)
        return role is not None and (roles is None or role in roles)

    def _can_write(self, token: _Token | None, namespace: str, repo_id: str | None = None) -> bool:
        if token is None or not self._member(token.user, namespace, WRITE_ORG_ROLES):
            return False
        if token.role == "fineGrained":
            return "repo.write" in token.scoped.get(namespace, []) or (
                repo_id is not None and "repo.write" in token.scoped.get(repo_id, [])
            )
        return token.role == "write"

    def _can_read(self, token: _Token | None, repo: _Repo) -> bool:
        if not repo.private:
            return True
        if token is None or not self._member(token.user, repo.namespace):
            return False
        if token.role == "fineGrained":
            perms = set(token.scoped.get(repo.namespace, [])) | set(token.scoped.get(repo.repo_id, []))
            return bool(perms & {"repo.content.read", "repo.write"})
        return True

    def _readable_repo(self, token: _Token | None, repo_id: str) -> _Repo:
        repo = self._repos.get(repo_id)
        if repo is None or not self._can_read(token, repo):
            # Like the Hub: a private repo you cannot see is indistinguishable from a missing one.
            raise HubError(401 if token is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _writable_repo(self, token: _Token | None, repo_id: str) -> _Repo:
        repo = self._readable_repo(token, repo_id)
        if not self._can_write(token, repo.namespace, repo_id):
            raise HubError(
                403, "You don't have write access to this repository: use a token with write access"
            )
        return repo

    def _check_download(self, token: _Token | None, repo: _Repo) -> None:
        if not repo.gated or (
            token is not None and (self._member(token.user, repo.namespace) or token.user in repo.granted)
        ):
            return
        if token is None:
            raise HubError(
                401,
                f"Access to model {repo.repo_id} is restricted. You must have access to it and be "
                "authenticated to access it. Please log in.",
                "GatedRepo",
            )
        raise HubError(
            403,
            f"Access to model {repo.repo_id} is restricted and you are not in the authorized list. "
            f"Visit {self.endpoint}/{repo.repo_id} to ask for access.",
            "GatedRepo",
        )

    # ------------------------------------------------------------------ HTTP plumbing

    def _handle(self, req: _Handler) -> None:
        method = req.command
        split = urlsplit(req.path)
        self.requests.append((method, split.path))
        try:
            body = self._read_body(req)
            answer = self._maybe_fail(method, split.path) or self._route(
                req, method, split.path, parse_qs(split.query), body
            )
        except HubError as exc:
            answer = _Answer.json({"error": exc.message, **exc.extra}, exc.status, exc.headers)
            # ASCII only: header values go out as latin-1 and the client reads the message from here first.
            answer.headers["X-Error-Message"] = exc.message.encode("ascii", "replace").decode()
            if exc.code:
                answer.headers["X-Error-Code"] = exc.code
        except Exception:  # a bug in this test server must show up as a 500, never as a hung client
            log.exception("loopback hub: unhandled error on %s %s", method, split.path)
            answer = _Answer.json({"error": "internal error in the loopback hub"}, 500)
        self._send(req, answer, head=method == "HEAD")

    def _read_body(self, req: _Handler) -> bytes:
        if req.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(req.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while req.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                total += size
                if total > self.max_body_bytes:
                    req.close_connection = True
                    raise HubError(413, "request body too large for the loopback hub")
                chunks.append(req.rfile.read(size))
                req.rfile.readline()
            return b"".join(chunks)
        length = int(req.headers.get("Content-Length") or 0)
        if length > self.max_body_bytes:
            req.close_connection = True  # the unread body would desynchronise the keep-alive stream
            raise HubError(413, "request body too large for the loopback hub")
        return req.rfile.read(length) if length else b""

    def _maybe_fail(self, method: str, path: str) -> _Answer | None:
        with self._lock:
            for failure in self._failures:
                if failure.remaining > 0 and failure.method == method and failure.pattern.search(path):
                    failure.remaining -= 1
                    return _Answer.json({"error": f"injected failure {failure.status}"}, failure.status)
        return None

    def _send(self, req: _Handler, answer: _Answer, *, head: bool) -> None:
        req.send_response(answer.status)
        headers = {"Content-Length": str(len(answer.body)), **answer.headers}
        for key, value in headers.items():
            req.send_header(key, value)
        req.end_headers()
        if not head and answer.body:
            req.wfile.write(answer.body)

    def _token(self, req: _Handler) -> _Token | None:
        auth = req.headers.get("Authorization")
        if not auth:
            return None
        scheme, _, value = auth.partition(" ")
        with self._lock:
            token = self._tokens.get(value.strip()) if scheme.lower() == "bearer" else None
        if token is None:
            raise HubError(401, INVALID_CREDENTIALS)
        return token

    def _route(
        self, req: _Handler, method: str, path: str, query: dict[str, list[str]], body: bytes
    ) -> _Answer:
        parts = [unquote(p) for p in path.split("/")[1:]]
        token = self._token(req)
        with self._lock:
            if parts[:1] == ["api"]:
                return self._route_api(method, parts[1:], query, body, token)
            if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
                repo_id, revision, filename = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
                return self._resolve_file(req, token, repo_id, revision, filename)
            if len(parts) >= 2 and parts[1].endswith(".git"):
                raise HubError(501, "git / LFS transfers are not supported by the loopback hub")
        raise HubError(404, f"no route for {method} {path}")

    def _route_api(
        self, method: str, parts: list[str], query: dict[str, list[str]], body: bytes, token: _Token | None
    ) -> _Answer:
        match method, parts:
            case "GET", ["whoami-v2"]:
                return self._whoami(token)
            case "GET", ["agent-harnesses"]:
                return _Answer.json({"standardEnvVars": [], "harnesses": {}})
            case "POST", ["validate-yaml"]:
                return self._validate_yaml(_json_body(body))
            case "POST", ["repos", "create"]:
                return self._create_repo(token, _json_body(body))
            case "DELETE", ["repos", "delete"]:
                return self._delete_repo(token, _json_body(body))
            case "GET", ["models", ns, name]:
                return self._model_info(token, f"{ns}/{name}", "main", query)
            case "GET", ["models", ns, name, "revision", revision]:
                return self._model_info(token, f"{ns}/{name}", revision, query)
            case "GET", ["models", ns, name, "tree", revision, *sub]:
                return self._tree(token, f"{ns}/{name}", revision, "/".join(sub), query)
            case "POST", ["models", ns, name, "preupload", revision]:
                return self._preupload(token, f"{ns}/{name}", revision, _json_body(body), query)
            case "POST", ["models", ns, name, "commit", revision]:
                return self._commit(token, f"{ns}/{name}", revision, body, query)
            case _, ["models", _, _, "xet-write-token" | "xet-read-token", *_]:
                raise HubError(
                    501, "Xet is not supported by the loopback hub (it answers uploadMode=regular)"
                )
        raise HubError(404, f"no API route for {method} /api/{'/'.join(parts)}")

    # ------------------------------------------------------------------ endpoints

    def _whoami(self, token: _Token | None) -> _Answer:
        if token is None:
            raise HubError(401, INVALID_CREDENTIALS)
        user = self._users[token.user]
        access: dict[str, Any] = {"displayName": token.display_name, "role": token.role, "createdAt": _iso(0)}
        if token.role == "fineGrained":
            scoped = []
            for entity, perms in token.scoped.items():
                kind = "user" if entity in self._users else "org" if entity in self._orgs else "model"
                scoped.append(
                    {"entity": {"_id": _oid24(entity), "type": kind, "name": entity}, "permissions": perms}
                )
            access["fineGrained"] = {"canReadGatedRepos": True, "global": [], "scoped": scoped}
        return _Answer.json(
            {
                "type": "user",
                "id": _oid24(user.name),
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
                        "id": _oid24(org),
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
                "auth": {"type": "access_token", "accessToken": access},
            }
        )

    def _validate_yaml(self, payload: dict[str, Any]) -> _Answer:
        content = str(payload.get("content", ""))
        errors: list[dict[str, str]] = []
        lines = content.splitlines()
        if lines and lines[0].strip() == "---":
            try:
                end = next(i for i, line in enumerate(lines[1:], 1) if line.strip() == "---")
            except StopIteration:
                errors.append({"message": "metadata block is not closed by '---'"})
            else:
                try:
                    import yaml

                    meta = yaml.safe_load("\n".join(lines[1:end]))
                    if meta is not None and not isinstance(meta, dict):
                        errors.append({"message": "metadata must be a YAML mapping"})
                except ImportError:
                    pass
                except Exception as exc:  # yaml.YAMLError and friends
                    errors.append({"message": f"invalid YAML: {exc}"})
        if errors:
            return _Answer.json({"errors": errors, "warnings": []}, 400)
        return _Answer.json({"errors": [], "warnings": []})

    def _create_repo(self, token: _Token | None, payload: dict[str, Any]) -> _Answer:
        if token is None:
            raise HubError(401, "You must be authenticated to create a repository")
        if payload.get("type", "model") != "model":
            raise HubError(400, "the loopback hub only hosts model repos")
        name = str(payload.get("name") or "")
        namespace = payload.get("organization") or token.user
        if not _REPO_NAME.match(name) or name.endswith(".git") or "--" in name or ".." in name:
            raise HubError(400, f"Invalid repo name: {name!r}")
        repo_id = f"{namespace}/{name}"
        if not self._can_write(token, namespace, repo_id):
            raise HubError(
                403, f'You don\'t have the rights to create a model under the namespace "{namespace}"'
            )
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self._repos:
            # The Hub's 409 carries the url: `create_repo(exist_ok=True)` builds its return value from it.
            raise HubError(409, "You already created this model repo", url=url)
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self._new_repo(repo_id, private=private)
        return _Answer.json({"url": url, "name": repo_id, "id": _oid24(repo_id)})

    def _delete_repo(self, token: _Token | None, payload: dict[str, Any]) -> _Answer:
        namespace = payload.get("organization") or (token.user if token else "")
        repo_id = f"{namespace}/{payload.get('name')}"
        self._writable_repo(token, repo_id)
        del self._repos[repo_id]
        return _Answer(200)

    def _model_info(
        self, token: _Token | None, repo_id: str, revision: str, query: dict[str, list[str]]
    ) -> _Answer:
        repo = self._readable_repo(token, repo_id)
        commit = self._resolve(repo, revision)
        blobs = _flag(query, "blobs")
        siblings = []
        for path in sorted(commit.files):
            entry: dict[str, Any] = {"rfilename": path}
            if blobs:
                entry.update(size=len(commit.files[path]), blobId=git_blob_oid(commit.files[path]))
            siblings.append(entry)
        return _Answer.json(
            {
                "_id": _oid24(repo_id),
                "id": repo_id,
                "modelId": repo_id,
                "author": repo.namespace,
                "sha": commit.oid,
                "lastModified": _iso(commit.date),
                "createdAt": _iso(repo.created),
                "private": repo.private,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "library_name": None,
                "siblings": siblings,
                "spaces": [],
                "usedStorage": sum(len(v) for v in commit.files.values()),
            }
        )

    def _tree(
        self, token: _Token | None, repo_id: str, revision: str, sub: str, query: dict[str, list[str]]
    ) -> _Answer:
        repo = self._readable_repo(token, repo_id)
        commit = self._resolve(repo, revision)
        prefix = f"{sub.strip('/')}/" if sub.strip("/") else ""
        recursive = _flag(query, "recursive")
        below = [p for p in commit.files if p.startswith(prefix)]
        if prefix and not below:
            raise HubError(404, f"Entry not found: {sub}", "EntryNotFound")
        entries: dict[str, dict[str, Any]] = {}
        for path in below:
            rest = path[len(prefix) :].split("/")
            # Directories between `prefix` and the file: all of them when recursive, the first one otherwise.
            for depth in range(1, len(rest) if recursive else min(2, len(rest))):
                folder = prefix + "/".join(rest[:depth])
                entries[folder] = {
                    "type": "directory",
                    "oid": _tree_oid(commit.files, folder),
                    "size": 0,
                    "path": folder,
                }
            if recursive or len(rest) == 1:
                data = commit.files[path]
                entries[path] = {"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": path}
        ordered = [entries[k] for k in sorted(entries)]
        start = int(query.get("cursor", ["0"])[0] or 0)
        page = ordered[start : start + self.tree_page_size]
        headers = {}
        if start + self.tree_page_size < len(ordered):
            # Cursor pagination through a `Link: rel="next"` header, which the client follows verbatim.
            sub_path = f"/{quote(sub, safe='')}" if sub else ""
            next_url = (
                f"{self.endpoint}/api/models/{repo_id}/tree/{quote(revision, safe='')}{sub_path}"
                f"?recursive={str(recursive).lower()}&expand=false&cursor={start + self.tree_page_size}"
            )
            headers["Link"] = f'<{next_url}>; rel="next"'
        return _Answer.json(page, headers=headers)

    def _preupload(
        self,
        token: _Token | None,
        repo_id: str,
        revision: str,
        payload: dict[str, Any],
        query: dict[str, list[str]],
    ) -> _Answer:
        repo = self._writable_repo(token, repo_id)
        if _flag(query, "create_pr"):
            raise HubError(400, "pull requests are not supported by the loopback hub")
        commit = self._resolve(repo, revision)
        files = []
        for item in payload.get("files", []):
            path = str(item["path"])
            existing = commit.files.get(path)
            # Every file is "regular": the client then inlines its content in the commit and never takes the
            # LFS / Xet path. `oid` lets it skip files that did not change, as on the real Hub.
            files.append(
                {
                    "path": path,
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_oid(existing) if existing is not None else None,
                }
            )
        return _Answer.json({"files": files, "commitOid": commit.oid})

    def _commit(
        self, token: _Token | None, repo_id: str, revision: str, body: bytes, query: dict[str, list[str]]
    ) -> _Answer:
        repo = self._writable_repo(token, repo_id)
        if _flag(query, "create_pr"):
            raise HubError(400, "pull requests are not supported by the loopback hub")
        if revision not in repo.branches:
            if _COMMIT_SHA.match(revision):
                raise HubError(400, "cannot commit on top of a commit sha: pass a branch")
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        head = repo.commits[repo.branches[revision]]
        try:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HubError(400, f"commit payload is not ndjson: {exc}") from None
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the first ndjson line of a commit must be the header")
        header = lines[0].get("value") or {}
        parent = header.get("parentCommit")
        if parent is not None and parent != head.oid:
            raise HubError(412, f"parentCommit {parent} is not the head of {revision} ({head.oid})")
        files = dict(head.files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            path = str(value.get("path", "")).strip("/")
            if not path:
                raise HubError(400, f"{key} operation without a path")
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"unsupported encoding {value.get('encoding')!r} for {path}")
                try:
                    files[path] = base64.b64decode(value["content"], validate=True)
                except (KeyError, binascii.Error) as exc:
                    raise HubError(400, f"bad base64 content for {path}: {exc}") from None
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                doomed = [p for p in files if p.startswith(path + "/")]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del files[p]
            elif key == "lfsFile":
                raise HubError(
                    400, f"LFS file {path} was never uploaded: the loopback hub only takes inline files"
                )
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        commit = self._add_commit(
            repo,
            revision,
            str(header.get("summary") or ""),
            str(header.get("description") or ""),
            files,
            head.oid,
        )
        return _Answer.json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.endpoint}/{repo_id}/commit/{commit.oid}",
                "hookOutput": "",
            }
        )

    def _resolve_file(
        self, req: _Handler, token: _Token | None, repo_id: str, revision: str, filename: str
    ) -> _Answer:
        repo = self._readable_repo(token, repo_id)
        commit = self._resolve(repo, revision)
        self._check_download(token, repo)
        data = commit.files.get(filename)
        if data is None:
            error = HubError(404, "Entry not found", "EntryNotFound")
            # The client caches the missing file under this commit (`.no_exist`), as with the real Hub.
            error.headers["X-Repo-Commit"] = commit.oid
            raise error
        headers = {
            "Content-Type": "application/octet-stream",
            # A regular git file: its ETag is the blob sha1 (the Hub uses the sha256 only for LFS files).
            "ETag": f'"{git_blob_oid(data)}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{filename.rsplit("/", 1)[-1]}"',
        }
        match = _RANGE.match(req.headers.get("Range", ""))
        if match and req.command == "GET" and (match[1] or match[2]):
            if match[1]:
                first, last = int(match[1]), int(match[2]) if match[2] else len(data) - 1
            else:
                first, last = max(len(data) - int(match[2]), 0), len(data) - 1
            if first >= len(data) or first > last:
                raise HubError(416, "Requested range not satisfiable")
            last = min(last, len(data) - 1)
            headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
            return _Answer(206, data[first : last + 1], headers)
        return _Answer(200, data, headers)


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body or b"{}")
    except json.JSONDecodeError as exc:
        raise HubError(400, f"body is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise HubError(400, "body must be a JSON object")
    return payload


def _flag(query: dict[str, list[str]], name: str) -> bool:
    return query.get(name, ["false"])[-1].lower() in ("1", "true")


def _oid24(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()[:24]


def _tree_oid(files: Mapping[str, bytes], folder: str) -> str:
    digest = hashlib.sha1(folder.encode())
    for path in sorted(p for p in files if p.startswith(folder + "/")):
        digest.update(path.encode() + git_blob_oid(files[path]).encode())
    return digest.hexdigest()
