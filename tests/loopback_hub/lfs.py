"""Git LFS as the Hub serves it: which files are LFS, the batch API with basic transfer, and the storage origin.

The flow the client takes without Xet (`HF_HUB_DISABLE_XET=1`; read from `huggingface_hub/lfs.py` and
`_commit_api.py`): preupload says `uploadMode: "lfs"` for a file that matches an LFS pattern of the repo's
`.gitattributes` or is at least `threshold` bytes (repos.py asks `wants_lfs`); `POST /{repo}.git/info/lfs/objects/batch`
answers each object with an `upload` action, a presigned URL on a second loopback origin standing for the Hub's
object storage (the client PUTs the bytes there without its token), and a `verify` action back on the Hub; the
commit then names the object in an `lfsFile` line (repos.py). `/resolve` of an LFS file redirects to the storage
origin with `X-Linked-Etag` (the sha256) and `X-Linked-Size`, as the Hub's CDN redirect does (files.py). The
storage origin's requests go to the hub's request log too, under `/lfs-storage/`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from .server import Answer, HubError, HubServer, Request

if TYPE_CHECKING:
    from .auth import Token
    from .repos import Repos

DEFAULT_LFS_THRESHOLD = 10 * 2**20  # the Hub refuses regular files above 10 MB
SHA256 = re.compile(r"^[0-9a-f]{64}$")
LFS_JSON = {"Content-Type": "application/vnd.git-lfs+json"}


@lru_cache(maxsize=4096)
def sha256_hex(data: bytes) -> str:
    # bytes cache their own hash, so looking up the same stored content again is cheap
    return hashlib.sha256(data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """The pointer file git keeps in the tree for an LFS object; its blob sha1 is the file's `oid` in listings."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256_hex(data)}\nsize {len(data)}\n".encode()


def lfs_patterns(gitattributes: bytes | None) -> list[str]:
    patterns = []
    for line in (gitattributes or b"").decode("utf-8", "replace").splitlines():
        parts = line.split()
        if len(parts) > 1 and not parts[0].startswith("#") and "filter=lfs" in parts[1:]:
            patterns.append(parts[0])
    return patterns


def wants_lfs(path: str, size: int, gitattributes: bytes | None, threshold: int) -> bool:
    """Git's rule for a pattern (no `/`: any basename; with `/`: the path from the root), plus the size limit."""
    if size >= threshold:
        return True
    name = path.rsplit("/", 1)[-1]
    for pattern in lfs_patterns(gitattributes):
        target = path if "/" in pattern.strip("/") else name
        if fnmatch.fnmatchcase(target, pattern.lstrip("/")):
            return True
    return False


@dataclass
class _Ticket:
    repo_id: str
    oid: str
    size: int


class _Storage(HubServer):
    """The object-storage origin: anonymous, presigned URLs only, like the S3 bucket behind the Hub."""

    def token_from_header(self, authorization: str | None) -> Token | None:
        return None


class Lfs:
    """Batch + verify on the Hub's origin, upload and download on the storage origin; objects by sha256."""

    def __init__(self, hub: HubServer, repos: Repos, *, threshold: int = DEFAULT_LFS_THRESHOLD) -> None:
        self.hub = hub
        self.repos = repos
        self.threshold = threshold
        self.objects: dict[str, bytes] = {}  # sha256 -> content, once uploaded and checked
        self._tickets: dict[str, _Ticket] = {}
        self._secret = secrets.token_bytes(16)
        self.storage = _Storage(max_body_bytes=hub.max_body_bytes)
        self.storage.requests = hub.requests  # one request log for both origins
        self.storage.auth_log = hub.auth_log
        self.storage.add_route("PUT", "/lfs-storage/upload/{ticket}", self._upload)
        self.storage.add_route("GET", "/lfs-storage/objects/{oid}", self._download)
        hub.add_route("POST", "/{ns}/{name}.git/info/lfs/objects/batch", self._batch)
        hub.add_route("POST", "/{ns}/{name}.git/info/lfs/objects/verify", self._verify)

    def start(self) -> None:
        self.storage.start()

    def stop(self) -> None:
        self.storage.stop()

    def download_url(self, oid: str) -> str:
        sig = hmac.new(self._secret, oid.encode(), "sha256").hexdigest()
        return f"{self.storage.endpoint}/lfs-storage/objects/{oid}?sig={sig}"

    # ------------------------------------------------------------------ the Hub's origin

    def _batch(self, req: Request) -> Answer:
        repo = self.repos.writable(req.token, req.repo_id)
        payload = req.json()
        if payload.get("operation") != "upload":
            raise HubError(400, "the loopback hub's LFS batch API only takes uploads (downloads go through /resolve)")
        if "basic" not in (payload.get("transfers") or ["basic"]):
            raise HubError(422, "the loopback hub only offers the basic LFS transfer")
        answers: list[dict[str, Any]] = []
        for item in payload.get("objects") or []:
            oid, size = str(item.get("oid", "")), item.get("size")
            if not SHA256.match(oid) or not isinstance(size, int) or size < 0:
                answers.append({"oid": oid, "size": size if isinstance(size, int) else 0,
                                "error": {"code": 422, "message": "oid must be a sha256 and size an integer"}})
                continue
            if oid in repo.lfs_oids and oid in self.objects:
                answers.append({"oid": oid, "size": size})  # no actions: the repo already has it
                continue
            ticket = secrets.token_urlsafe(16)
            self._tickets[ticket] = _Ticket(repo.repo_id, oid, size)
            verify = f"{self.hub.endpoint}/{repo.repo_id}.git/info/lfs/objects/verify"
            answers.append({
                "oid": oid,
                "size": size,
                "authenticated": True,
                "actions": {
                    "upload": {"href": f"{self.storage.endpoint}/lfs-storage/upload/{ticket}", "expires_in": 900},
                    "verify": {"href": verify, "header": {}},
                },
            })
        return Answer.json({"transfer": "basic", "objects": answers, "hash_algo": "sha256"}, headers=LFS_JSON)

    def _verify(self, req: Request) -> Answer:
        repo = self.repos.writable(req.token, req.repo_id)
        payload = req.json()
        oid, size = str(payload.get("oid", "")), payload.get("size")
        data = self.objects.get(oid)
        if data is None or len(data) != size:
            raise HubError(404, f"LFS object {oid} of {size} bytes was not uploaded")
        repo.lfs_oids.add(oid)
        return Answer.json({"oid": oid, "size": size}, headers=LFS_JSON)

    def committed(self, token: Token | None, repo_id: str, oid: str, size: int | None) -> bytes:
        """The content an `lfsFile` commit line names; refused if it never went through batch + upload + verify."""
        repo = self.repos.repos[repo_id]
        data = self.objects.get(oid)
        if data is None or oid not in repo.lfs_oids:
            raise HubError(400, f"LFS object {oid} is not in {repo_id}: upload it through the LFS batch API first")
        if size is not None and size != len(data):
            raise HubError(400, f"LFS object {oid} has {len(data)} bytes, the commit says {size}")
        return data

    # ------------------------------------------------------------------ the storage origin

    def _upload(self, req: Request) -> Answer:
        with self.hub._lock:
            ticket = self._tickets.pop(req.params["ticket"], None)
        if ticket is None:
            raise HubError(403, "unknown or already used upload URL")
        if len(req.body) != ticket.size or sha256_hex(req.body) != ticket.oid:
            raise HubError(400, f"uploaded content does not match oid {ticket.oid} and size {ticket.size}")
        with self.hub._lock:
            self.objects[ticket.oid] = req.body
        return Answer(200)

    def _download(self, req: Request) -> Answer:
        from .files import ranged

        oid = req.params["oid"]
        expected = hmac.new(self._secret, oid.encode(), "sha256").hexdigest()
        if not hmac.compare_digest(req.query.get("sig", [""])[-1], expected):
            raise HubError(403, "bad or missing signature on the storage URL")
        with self.hub._lock:
            data = self.objects.get(oid)
        if data is None:
            raise HubError(404, f"no LFS object {oid}")
        return ranged(req, data, {"Content-Type": "application/octet-stream", "ETag": f'"{oid}"',
                                  "Accept-Ranges": "bytes"})
