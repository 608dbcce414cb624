"""Model repos as the Hub keeps them: commits and branches, creation and deletion, preupload and ndjson commits."""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .auth import Auth, Token, oid24
from .lfs import sha256_hex, wants_lfs
from .server import Answer, HubError, Request

if TYPE_CHECKING:
    from .lfs import Lfs
    from .server import HubServer

# The `.gitattributes` the Hub writes into every new model repo (abridged): a new repo is "empty" but for it.
DEFAULT_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pth filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    b"*.model filter=lfs diff=lfs merge=lfs -text\n"
    b"*tfevents* filter=lfs diff=lfs merge=lfs -text\n"
)
REPO_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_-])?$")
COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
REPO = "/api/models/{ns}/{name}"


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1, which the Hub uses as `oid`, ETag and preupload `oid` of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    description: str
    files: dict[str, bytes]
    date: float
    lfs: frozenset[str] = frozenset()  # paths stored as LFS objects (the git tree holds their pointer)


@dataclass
class Repo:
    repo_id: str
    private: bool
    gated: bool
    created: float
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    granted: set[str] = field(default_factory=set)
    lfs_oids: set[str] = field(default_factory=set)  # sha256 of the LFS objects this repo holds

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/", 1)[0]


class Repos:
    """The repo store plus the write endpoints; reads (info, tree, resolve) live in `files.py`."""

    def __init__(self, server: HubServer, auth: Auth) -> None:
        self.server = server
        self.auth = auth
        self.repos: dict[str, Repo] = {}
        self.lfs: Lfs | None = None  # plugged in by LoopbackHub; without it every file is regular
        self._counter = itertools.count()
        add = server.add_route
        add("GET", "/api/agent-harnesses", lambda req: Answer.json({"standardEnvVars": [], "harnesses": {}}))
        add("POST", "/api/validate-yaml", self._validate_yaml)
        add("POST", "/api/repos/create", self._create_repo)
        add("DELETE", "/api/repos/delete", self._delete_repo)
        add("POST", REPO + "/preupload/{revision}", self._preupload)
        add("POST", REPO + "/commit/{revision}", self._commit)

    # ------------------------------------------------------------------ store

    def new_repo(self, repo_id: str, *, private: bool) -> Repo:
        repo = Repo(repo_id=repo_id, private=private, gated=False, created=time.time())
        self.repos[repo_id] = repo
        self.add_commit(repo, "main", "initial commit", "", {".gitattributes": DEFAULT_GITATTRIBUTES}, None)
        return repo

    def add_commit(
        self,
        repo: Repo,
        branch: str,
        title: str,
        description: str,
        files: dict[str, bytes],
        parent: str | None,
        lfs: frozenset[str] = frozenset(),
    ) -> Commit:
        seed = f"{repo.repo_id}\0{parent}\0{title}\0{next(self._counter)}\0{time.time_ns()}".encode()
        digest = hashlib.sha1(seed)
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + git_blob_oid(files[path]).encode())
        commit = Commit(digest.hexdigest(), parent, title, description, files, time.time(), lfs & set(files))
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    def lfs_mode(self, commit: Commit, path: str, size: int) -> bool:
        """Whether the Hub would store `path` of `size` bytes as LFS on top of `commit`."""
        if self.lfs is None or size == 0:  # the client sends empty files inline anyway
            return False
        return wants_lfs(path, size, commit.files.get(".gitattributes"), self.lfs.threshold)

    def resolve(self, repo: Repo, revision: str) -> Commit:
        if revision in repo.branches:
            return repo.commits[repo.branches[revision]]
        if COMMIT_SHA.match(revision) and revision in repo.commits:
            return repo.commits[revision]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def readable(self, token: Token | None, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self.auth.can_read_private(token, repo.namespace, repo_id)):
            # Like the Hub: a private repo you cannot see is indistinguishable from a missing one.
            raise HubError(401 if token is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def writable(self, token: Token | None, repo_id: str) -> Repo:
        repo = self.readable(token, repo_id)
        if not self.auth.can_write(token, repo.namespace, repo_id):
            raise HubError(403, "You don't have write access to this repository: use a token with write access")
        return repo

    # ------------------------------------------------------------------ endpoints

    def _validate_yaml(self, req: Request) -> Answer:
        content = str(req.json().get("content", ""))
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
        return Answer.json({"errors": errors, "warnings": []}, 400 if errors else 200)

    def _create_repo(self, req: Request) -> Answer:
        token, payload = req.token, req.json()
        if token is None:
            raise HubError(401, "You must be authenticated to create a repository")
        if payload.get("type", "model") != "model":
            raise HubError(400, "the loopback hub only hosts model repos")
        name = str(payload.get("name") or "")
        namespace = payload.get("organization") or token.user
        if not REPO_NAME.match(name) or name.endswith(".git") or "--" in name or ".." in name:
            raise HubError(400, f"Invalid repo name: {name!r}")
        repo_id = f"{namespace}/{name}"
        if not self.auth.can_write(token, namespace, repo_id, create=repo_id not in self.repos):
            raise HubError(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        url = f"{self.server.endpoint}/{repo_id}"
        if repo_id in self.repos:
            # The Hub's 409 carries the url: `create_repo(exist_ok=True)` builds its return value from it.
            raise HubError(409, "You already created this model repo", url=url)
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.new_repo(repo_id, private=private)
        return Answer.json({"url": url, "name": repo_id, "id": oid24(repo_id)})

    def _delete_repo(self, req: Request) -> Answer:
        payload = req.json()
        namespace = payload.get("organization") or (req.token.user if req.token else "")
        repo_id = f"{namespace}/{payload.get('name')}"
        self.writable(req.token, repo_id)
        del self.repos[repo_id]
        return Answer(200)

    def _preupload(self, req: Request) -> Answer:
        repo = self.writable(req.token, req.repo_id)
        if req.flag("create_pr"):
            raise HubError(400, "pull requests are not supported by the loopback hub")
        commit = self.resolve(repo, req.params["revision"])
        files = []
        for item in req.json().get("files", []):
            path = str(item["path"])
            lfs = self.lfs_mode(commit, path, int(item.get("size") or 0))
            existing = commit.files.get(path)
            # `oid` lets the client skip files that did not change: the sha256 for LFS, the git sha1 otherwise.
            oid = None if existing is None else sha256_hex(existing) if lfs else git_blob_oid(existing)
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return Answer.json({"files": files, "commitOid": commit.oid})

    def _commit(self, req: Request) -> Answer:
        repo = self.writable(req.token, req.repo_id)
        revision = req.params["revision"]
        if req.flag("create_pr"):
            raise HubError(400, "pull requests are not supported by the loopback hub")
        if revision not in repo.branches:
            if COMMIT_SHA.match(revision):
                raise HubError(400, "cannot commit on top of a commit sha: pass a branch")
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        head = repo.commits[repo.branches[revision]]
        try:
            lines = [json.loads(line) for line in req.body.decode().splitlines() if line.strip()]
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HubError(400, f"commit payload is not ndjson: {exc}") from None
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the first ndjson line of a commit must be the header")
        header = lines[0].get("value") or {}
        parent = header.get("parentCommit")
        if parent is not None and parent != head.oid:
            raise HubError(412, f"parentCommit {parent} is not the head of {revision} ({head.oid})")
        files, lfs = dict(head.files), set(head.lfs)
        for line in lines[1:]:
            self._apply(req, files, lfs, line.get("key"), line.get("value") or {})
        commit = self.add_commit(
            repo,
            revision,
            str(header.get("summary") or ""),
            str(header.get("description") or ""),
            files,
            head.oid,
            frozenset(lfs),
        )
        return Answer.json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.server.endpoint}/{req.repo_id}/commit/{commit.oid}",
                "hookOutput": "",
            }
        )

    def _apply(
        self, req: Request, files: dict[str, bytes], lfs: set[str], key: Any, value: Mapping[str, Any]
    ) -> None:
        path = str(value.get("path", "")).strip("/")
        if not path:
            raise HubError(400, f"{key} operation without a path")
        if key == "file":
            if value.get("encoding") != "base64":
                raise HubError(400, f"unsupported encoding {value.get('encoding')!r} for {path}")
            try:
                content = base64.b64decode(value["content"], validate=True)
            except (KeyError, binascii.Error) as exc:
                raise HubError(400, f"bad base64 content for {path}: {exc}") from None
            if self.lfs is not None and content and wants_lfs(
                path, len(content), files.get(".gitattributes"), self.lfs.threshold
            ):
                # Stricter than needed on purpose: a client that inlined a shard skipped the LFS path under test.
                raise HubError(400, f"{path} must be uploaded through LFS (preupload said so)")
            files[path] = content
            lfs.discard(path)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            lfs.discard(path)
        elif key == "deletedFolder":
            doomed = [p for p in files if p.startswith(path + "/")]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for p in doomed:
                del files[p]
                lfs.discard(p)
        elif key == "lfsFile":
            if self.lfs is None or value.get("algo", "sha256") != "sha256":
                raise HubError(400, f"LFS file {path}: this hub takes sha256 LFS objects only")
            size = value.get("size")
            files[path] = self.lfs.committed(req.token, req.repo_id, str(value.get("oid", "")), size)
            lfs.add(path)
        else:
            raise HubError(400, f"unknown commit operation {key!r}")
