"""The Hub as an OpenID Connect provider: what gradio's "Sign in with Hugging Face" talks to on a Space.

A Space with `hf_oauth: true` gets OAUTH_CLIENT_ID / OAUTH_CLIENT_SECRET / OAUTH_SCOPES / OPENID_PROVIDER_URL;
gradio (`gradio/oauth.py`, through authlib's starlette client) reads `OPENID_PROVIDER_URL +
/.well-known/openid-configuration`, sends the browser to `authorization_endpoint`, exchanges the code at
`token_endpoint` (client_secret_basic, or the secret in the form) and validates the RS256 `id_token` against
`jwks_uri`, whose claims become the session's profile. This module serves those endpoints plus `userinfo`:

    app = hub.oauth.register_app("space-client", "space-secret", redirect_prefix=space_url,
                                 scopes="openid profile write-repos manage-repos")
    hub.oauth.signed_in = "alice"   # the user whose Hub browser session approves the request

There is no consent page: the authorize endpoint approves at once for `signed_in` and redirects back with a code,
as the Hub does for an app the user already authorized. An issued access token is a token of that user with the
granted scopes: it may write to repos where the user may write only with `write-repos` (creating needs
`manage-repos` too), and whoami-v2 describes it as an OAuth token (no `accessToken` role, as on the Hub).
`issued` lists what was handed out, so tests can tell which token a request used (`hub.token_log`).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from .auth import oid24
from .server import Answer, HubError, Request

if TYPE_CHECKING:
    from .hub import LoopbackHub

TOKEN_LIFETIME_S = 8 * 3600  # what the Hub gives an OAuth access token
SUPPORTED_SCOPES = ("openid", "profile", "email", "read-repos", "write-repos", "manage-repos", "inference-api")


@dataclass
class OAuthApp:
    client_id: str
    client_secret: str
    redirect_prefix: str  # a redirect_uri must start with it (the Space's URL)
    scopes: frozenset[str]


@dataclass
class _Grant:
    client_id: str
    user: str
    scopes: frozenset[str]
    redirect_uri: str
    nonce: str | None
    issued: float


@dataclass
class IssuedToken:
    token: str
    user: str
    client_id: str
    scopes: frozenset[str]
    display_name: str


class OAuth:
    def __init__(self, hub: LoopbackHub) -> None:
        self.hub = hub
        self.apps: dict[str, OAuthApp] = {}
        self.signed_in: str | None = None
        self.issued: list[IssuedToken] = []
        self._codes: dict[str, _Grant] = {}
        self._key = None  # an RSA key, made on first use (key generation costs a fraction of a second)
        add = hub.add_route
        add("GET", "/.well-known/openid-configuration", self._configuration)
        add("GET", "/oauth/authorize", self._authorize)
        add("POST", "/oauth/token", self._token)
        add("GET", "/oauth/userinfo", self._userinfo)
        add("GET", "/oauth/jwks", self._jwks)

    def register_app(self, client_id: str, client_secret: str, *, redirect_prefix: str, scopes: str) -> OAuthApp:
        app = OAuthApp(client_id, client_secret, redirect_prefix, frozenset(scopes.split()))
        with self.hub._lock:
            self.apps[client_id] = app
        return app

    # ------------------------------------------------------------------ endpoints

    def _configuration(self, req: Request) -> Answer:
        base = self.hub.endpoint
        return Answer.json({
            "issuer": base,
            "authorization_endpoint": f"{base}/oauth/authorize",
            "token_endpoint": f"{base}/oauth/token",
            "userinfo_endpoint": f"{base}/oauth/userinfo",
            "jwks_uri": f"{base}/oauth/jwks",
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "scopes_supported": list(SUPPORTED_SCOPES),
            "claims_supported": ["sub", "name", "preferred_username", "profile", "picture", "email"],
        })

    def _authorize(self, req: Request) -> Answer:
        query = {k: v[-1] for k, v in req.query.items()}
        app = self.apps.get(query.get("client_id", ""))
        if app is None:
            raise HubError(400, "invalid_client: unknown client_id")
        redirect_uri = query.get("redirect_uri", "")
        if not redirect_uri.startswith(app.redirect_prefix):
            raise HubError(400, f"invalid_request: redirect_uri {redirect_uri!r} is not registered for this app")
        if query.get("response_type") != "code":
            raise HubError(400, "unsupported_response_type: only 'code' is supported")
        scopes = frozenset(query.get("scope", "").split())
        if not scopes <= app.scopes:
            raise HubError(400, f"invalid_scope: {' '.join(sorted(scopes - app.scopes))} not allowed for this app")
        if self.signed_in is None:
            raise HubError(401, "sign in to the Hub first (the loopback hub has no signed-in user)")
        code = secrets.token_urlsafe(24)
        self._codes[code] = _Grant(app.client_id, self.signed_in, scopes, redirect_uri, query.get("nonce"),
                                   time.time())
        back = {"code": code, **({"state": query["state"]} if "state" in query else {})}
        separator = "&" if "?" in redirect_uri else "?"
        return Answer.redirect(redirect_uri + separator + urlencode(back))

    def _token(self, req: Request) -> Answer:
        form = req.form()
        if form.get("grant_type") != "authorization_code":
            raise HubError(400, "unsupported_grant_type")
        app = self._client(req, form)
        grant = self._codes.pop(form.get("code", ""), None)  # a code is good once
        if grant is None or grant.client_id != app.client_id or time.time() - grant.issued > 600:
            raise HubError(400, "invalid_grant: unknown, used or expired code")
        if form.get("redirect_uri") != grant.redirect_uri:
            raise HubError(400, "invalid_grant: redirect_uri differs from the authorization request")
        access = "hf_oauth_" + secrets.token_urlsafe(24)
        display = f"oauth-{grant.user}-{len(self.issued)}"
        self.hub.auth.add_oauth_token(grant.user, access, grant.scopes, display, time.time() + TOKEN_LIFETIME_S)
        self.issued.append(IssuedToken(access, grant.user, app.client_id, grant.scopes, display))
        payload = {"access_token": access, "token_type": "Bearer", "expires_in": TOKEN_LIFETIME_S,
                   "scope": " ".join(sorted(grant.scopes))}
        if "openid" in grant.scopes:
            payload["id_token"] = self._id_token(grant, app.client_id)
        return Answer.json(payload, headers={"Cache-Control": "no-store"})

    def _userinfo(self, req: Request) -> Answer:
        token = req.token
        if token is None or token.role != "oauth":
            raise HubError(401, "userinfo needs an OAuth access token")
        return Answer.json(self._claims(token.user))

    def _jwks(self, req: Request) -> Answer:
        return Answer.json({"keys": [self._signing_key().as_dict(private=False)]})

    # ------------------------------------------------------------------ helpers

    def _client(self, req: Request, form: dict[str, str]) -> OAuthApp:
        """The app authenticating at the token endpoint: HTTP Basic (authlib's default) or form fields."""
        import base64
        import binascii

        client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        scheme, _, value = (req.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() == "basic":
            try:
                client_id, _, secret = base64.b64decode(value).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise HubError(401, "invalid_client: malformed Basic credentials") from None
        app = self.apps.get(client_id)
        if app is None or not secrets.compare_digest(app.client_secret, secret):
            raise HubError(401, "invalid_client")
        return app

    def _claims(self, user: str) -> dict[str, str]:
        base = self.hub.endpoint
        return {"sub": oid24(user), "name": user.title(), "preferred_username": user, "profile": f"{base}/{user}",
                "picture": f"{base}/avatars/default.svg"}

    def _id_token(self, grant: _Grant, client_id: str) -> str:
        from joserfc import jwt  # authlib's own JOSE library, installed with gradio[oauth]

        now = int(time.time())
        claims = {"iss": self.hub.endpoint, "aud": client_id, "iat": now, "exp": now + 3600, "auth_time": now,
                  **self._claims(grant.user)}
        if grant.nonce:
            claims["nonce"] = grant.nonce
        key = self._signing_key()
        return jwt.encode({"alg": "RS256", "kid": key.kid}, claims, key)

    def _signing_key(self):  # noqa: ANN202  (joserfc's RSAKey, imported lazily)
        if self._key is None:
            from joserfc.jwk import RSAKey

            self._key = RSAKey.generate_key(2048, parameters={"kid": "loopback-hub-1", "use": "sig"})
        return self._key
