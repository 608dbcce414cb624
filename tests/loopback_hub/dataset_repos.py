"""Read-only dataset repos: what `datasets.load_dataset("<ns>/<name>")` reads from the Hub (info, tree, resolve).

Enough for a calibration dataset of plain data files (`.txt`, `.jsonl`, `.parquet`) without a loading script:
dataset info, tree listing, paths-info and `/datasets/.../resolve` downloads. Dataset repos live in the same store
as models under the key `datasets/<ns>/<name>` (so a dataset and a model may share a name, as on the Hub) and are
seeded by tests with `hub.seed_dataset`; pushing to a dataset repo is not served.
"""

from __future__ import annotations

from typing import Any

from .auth import iso, oid24
from .files import Files, blob_oid
from .server import Answer, HubError, Request

PREFIX = "datasets/"


class DatasetRepos:
    def __init__(self, hub: Any) -> None:
        self.hub = hub
        self.files: Files = hub.files
        api = "/api/datasets/{ns}/{name}"
        add = hub.add_route
        add("GET", api, self._info)
        add("GET", api + "/revision/{revision}", self._info)
        add("GET", api + "/tree/{revision}", self._as_store(self.files._tree))
        add("GET", api + "/tree/{revision}/{sub...}", self._as_store(self.files._tree))
        add("POST", api + "/paths-info/{revision}", self._paths_info)
        add("GET", "/datasets/{ns}/{name}/resolve/{revision}/{filename...}", self._as_store(self.files._resolve_file))

    @staticmethod
    def _as_store(handler: Any) -> Any:
        """Run a model-repo handler on the dataset's store key (`datasets/<ns>/<name>`)."""

        def run(req: Request) -> Answer:
            req.params["ns"] = PREFIX + req.params["ns"]
            return handler(req)

        return run

    def _repo_and_commit(self, req: Request) -> tuple[Any, Any]:
        key = f"{PREFIX}{req.params['ns']}/{req.params['name']}"
        repo = self.hub.store.repos.get(key)
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo, self.hub.store.resolve(repo, req.params.get("revision", "main"))

    def _info(self, req: Request) -> Answer:
        repo, commit = self._repo_and_commit(req)
        repo_id = repo.repo_id.removeprefix(PREFIX)
        return Answer.json({
            "_id": oid24(repo.repo_id), "id": repo_id, "author": repo_id.split("/")[0], "sha": commit.oid,
            "lastModified": iso(commit.date), "createdAt": iso(repo.created), "private": repo.private,
            "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [], "cardData": {},
            "siblings": [{"rfilename": p} for p in sorted(commit.files)],
        })

    def _paths_info(self, req: Request) -> Answer:
        _repo, commit = self._repo_and_commit(req)
        wanted = req.form().get("paths")
        paths = [wanted] if wanted else []
        out = []
        for path in paths:
            if path in commit.files:
                out.append({"type": "file", "path": path, "oid": blob_oid(commit, path),
                            "size": len(commit.files[path])})
            elif any(p.startswith(path.rstrip("/") + "/") for p in commit.files):
                out.append({"type": "directory", "path": path, "oid": oid24(path), "size": 0})
        return Answer.json(out)
