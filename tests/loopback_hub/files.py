"""The read side of repos: model info, tree listing with cursor pagination, `/resolve` downloads with ranges."""

from __future__ import annotations

import hashlib
import re
from typing import Any
from urllib.parse import quote

from .auth import Token, iso, oid24
from .lfs import lfs_pointer, sha256_hex
from .repos import REPO, Commit, Repo, Repos, git_blob_oid
from .server import Answer, HubError, Request

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _tree_oid(commit: Commit, folder: str) -> str:
    digest = hashlib.sha1(folder.encode())
    for path in sorted(p for p in commit.files if p.startswith(folder + "/")):
        digest.update(path.encode() + blob_oid(commit, path).encode())
    return digest.hexdigest()


def blob_oid(commit: Commit, path: str) -> str:
    """The git blob sha1 of what the git tree holds: the content, or for an LFS file its pointer."""
    data = commit.files[path]
    return git_blob_oid(lfs_pointer(data) if path in commit.lfs else data)


class Files:
    """Read endpoints over a `Repos` store; gated repos are enforced on downloads only, as on the Hub."""

    def __init__(self, repos: Repos, *, tree_page_size: int) -> None:
        self.repos = repos
        self.server = repos.server
        self.tree_page_size = tree_page_size
        add = self.server.add_route
        add("GET", REPO, self._model_info)
        add("GET", REPO + "/revision/{revision}", self._model_info)
        add("GET", REPO + "/tree/{revision}", self._tree)
        add("GET", REPO + "/tree/{revision}/{sub...}", self._tree)
        add("GET", "/{ns}/{name}/resolve/{revision}/{filename...}", self._resolve_file)

    def _model_info(self, req: Request) -> Answer:
        repo = self.repos.readable(req.token, req.repo_id)
        commit = self.repos.resolve(repo, req.params.get("revision", "main"))
        siblings = []
        for path in sorted(commit.files):
            entry: dict[str, Any] = {"rfilename": path}
            if req.flag("blobs"):
                data = commit.files[path]
                entry.update(size=len(data), blobId=blob_oid(commit, path))
                if path in commit.lfs:
                    pointer_size = len(lfs_pointer(data))
                    entry["lfs"] = {"sha256": sha256_hex(data), "size": len(data), "pointerSize": pointer_size}
            siblings.append(entry)
        return Answer.json(
            {
                "_id": oid24(repo.repo_id),
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": repo.namespace,
                "sha": commit.oid,
                "lastModified": iso(commit.date),
                "createdAt": iso(repo.created),
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

    def _tree(self, req: Request) -> Answer:
        repo = self.repos.readable(req.token, req.repo_id)
        revision, sub = req.params["revision"], req.params.get("sub", "")
        commit = self.repos.resolve(repo, revision)
        prefix = f"{sub.strip('/')}/" if sub.strip("/") else ""
        recursive = req.flag("recursive")
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
                    "oid": _tree_oid(commit, folder),
                    "size": 0,
                    "path": folder,
                }
            if recursive or len(rest) == 1:
                data = commit.files[path]
                entries[path] = {"type": "file", "oid": blob_oid(commit, path), "size": len(data), "path": path}
                if path in commit.lfs:
                    pointer = lfs_pointer(data)
                    entries[path]["lfs"] = {"oid": sha256_hex(data), "size": len(data), "pointerSize": len(pointer)}
        ordered = [entries[k] for k in sorted(entries)]
        start = int(req.query.get("cursor", ["0"])[0] or 0)
        page = ordered[start : start + self.tree_page_size]
        headers = {}
        if start + self.tree_page_size < len(ordered):
            # Cursor pagination through a `Link: rel="next"` header, which the client follows verbatim.
            sub_path = f"/{quote(sub, safe='')}" if sub else ""
            next_url = (
                f"{self.server.endpoint}/api/models/{repo.repo_id}/tree/{quote(revision, safe='')}{sub_path}"
                f"?recursive={str(recursive).lower()}&expand=false&cursor={start + self.tree_page_size}"
            )
            headers["Link"] = f'<{next_url}>; rel="next"'
        return Answer.json(page, headers=headers)

    def check_download(self, token: Token | None, repo: Repo) -> None:
        if not repo.gated or (
            token is not None and (self.repos.auth.member(token.user, repo.namespace) or token.user in repo.granted)
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
            f"Visit {self.server.endpoint}/{repo.repo_id} to ask for access.",
            "GatedRepo",
        )

    def _resolve_file(self, req: Request) -> Answer:
        repo = self.repos.readable(req.token, req.repo_id)
        commit = self.repos.resolve(repo, req.params["revision"])
        self.check_download(req.token, repo)
        filename = req.params["filename"]
        data = commit.files.get(filename)
        if data is None:
            error = HubError(404, "Entry not found", "EntryNotFound")
            # The client caches the missing file under this commit (`.no_exist`), as with the real Hub.
            error.headers["X-Repo-Commit"] = commit.oid
            raise error
        if filename in commit.lfs and self.repos.lfs is not None:
            # As the Hub does for LFS files: a redirect to the storage origin; the file's metadata rides on it.
            sha = sha256_hex(data)
            return Answer.redirect(self.repos.lfs.download_url(sha), headers={
                "ETag": f'"{blob_oid(commit, filename)}"',
                "X-Linked-Etag": f'"{sha}"',
                "X-Linked-Size": str(len(data)),
                "X-Repo-Commit": commit.oid,
            })
        headers = {
            "Content-Type": "application/octet-stream",
            # A regular git file: its ETag is the blob sha1 (the Hub uses the sha256 only for LFS files).
            "ETag": f'"{git_blob_oid(data)}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{filename.rsplit("/", 1)[-1]}"',
        }
        return ranged(req, data, headers)


def ranged(req: Request, data: bytes, headers: dict[str, str]) -> Answer:
    """A 200 with the whole body or a 206 for a `Range: bytes=a-b` GET, as the client's resumed downloads ask."""
    match = _RANGE.match(req.headers.get("Range", ""))
    if match and req.method == "GET" and (match[1] or match[2]):
        if match[1]:
            first, last = int(match[1]), int(match[2]) if match[2] else len(data) - 1
        else:
            first, last = max(len(data) - int(match[2]), 0), len(data) - 1
        if first >= len(data) or first > last:
            raise HubError(416, "Requested range not satisfiable")
        last = min(last, len(data) - 1)
        return Answer(206, data[first : last + 1], {**headers, "Content-Range": f"bytes {first}-{last}/{len(data)}"})
    return Answer(200, data, headers)


__all__ = ["Commit", "Files", "ranged"]
