"""A loopback Hugging Face Hub for tests: the real `huggingface_hub` client talks to it on 127.0.0.1.

It speaks the subset of the Hub API that the installed `huggingface_hub` uses for whoami, repo creation, repo
info, tree listing, preupload + ndjson commits, Git LFS (batch API, basic transfer, verify) and `/resolve`
downloads, with the same request and response shapes (read from the installed client: `hf_api.py`,
`_commit_api.py`, `lfs.py`, `file_download.py`, `utils/_http.py`). Weights (`.safetensors`, any file of 10 MB or
more) are LFS, as on the Hub; Xet storage cannot be served, so clients must run with `HF_HUB_DISABLE_XET=1`
(tests/test_hub.py's `hf_env` sets it), which makes them take the LFS path.
Errors carry the `X-Error-Code` header that `hf_raise_for_status` maps to `RepositoryNotFoundError`,
`GatedRepoError`, `RevisionNotFoundError` and `RemoteEntryNotFoundError`.

    with LoopbackHub() as hub:
        hub.add_user("alice", "hf_alice_write", orgs=("acme",))
        hub.seed_repo("upstream/tiny", {"config.json": b"{}"}, gated=True)
        ...  # point HF_ENDPOINT / HfApi(endpoint=hub.endpoint) at hub.endpoint
        hub.repo_files("alice/out")  # {path: bytes} at the head of main
        hub.auth_log  # (method, path, user of the token) of every request that presented a token
        hub.token_log  # the same with the token's display name (`hub.token_name(token)`)

Layout, one concern per module:

- `server.py`: threaded HTTP/1.1 server, `Request` / `Answer` / `HubError`, the routing table, request log and
  `fail_next` failure injection. No Hub semantics.
- `auth.py`: users, orgs, tokens, whoami-v2 and the read / write permission rules.
- `repos.py`: the repo store (commits, branches), repo create / delete, preupload and the ndjson commit.
- `lfs.py`: which files are LFS, the batch + verify endpoints, and a second loopback origin standing for the
  Hub's object storage (presigned upload and download URLs; its requests land in the same `requests` log).
- `files.py`: model info, tree listing, `/resolve` downloads (with `Range`; LFS files redirect to storage).
- `oauth.py`: the OpenID Connect provider a Space's "Sign in with Hugging Face" uses (discovery, authorize with
  auto-approval for `hub.oauth.signed_in`, token, userinfo, JWKS); issued tokens carry OAuth scopes.
- `dataset_repos.py`: read-only dataset repos (`hub.seed_dataset`) as `datasets.load_dataset` reads them.
- `hub.py`: `LoopbackHub`, which plugs the concerns together and carries the helpers tests call.

Adding a concern (the hook): write a module with a class whose constructor takes the hub and registers its
routes with `hub.add_route(method, template, handler)`. A template is a path where `{x}` matches one segment
and `{x...}` the rest (`/api/jobs/{namespace}/{job_id}/logs`); a handler takes a `Request` (`.params`, `.query`,
`.json()`, `.form()`, `.token` = the bearer token's `Token` or None, 401 if unknown) and returns an `Answer`
(`Answer.json(payload)`) or raises `HubError(status, message)`. It may use `hub.auth` (accounts and
permissions), `hub.store` (repos) and `hub.files`. Plug it in for one hub with
`LoopbackHub(extensions={"jobs": Jobs})`, or for every hub by adding it to `hub.DEFAULT_EXTENSIONS`; the instance
is then `hub.extensions["jobs"]`. Handlers run under the hub's lock, so they must not block for long.

The server never logs tokens or headers (only method, path and status, at DEBUG), bounds request bodies and
socket idle time, and closes every open connection when stopped.
"""

from .auth import INVALID_CREDENTIALS, WRITE_ORG_ROLES, Token
from .hub import DEFAULT_EXTENSIONS, LoopbackHub
from .repos import DEFAULT_GITATTRIBUTES, git_blob_oid
from .server import Answer, HubError, Request

__all__ = [
    "DEFAULT_EXTENSIONS",
    "DEFAULT_GITATTRIBUTES",
    "INVALID_CREDENTIALS",
    "WRITE_ORG_ROLES",
    "Answer",
    "HubError",
    "LoopbackHub",
    "Request",
    "Token",
    "git_blob_oid",
]
