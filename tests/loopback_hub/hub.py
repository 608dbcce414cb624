"""`LoopbackHub`: the HTTP core with every concern plugged in, and the helpers tests call."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from .auth import Auth, Token
from .dataset_repos import PREFIX as DATASET_PREFIX
from .dataset_repos import DatasetRepos
from .files import Files
from .lfs import DEFAULT_LFS_THRESHOLD, Lfs, sha256_hex
from .oauth import OAuth
from .repos import Repos
from .server import HubError, HubServer, Request

# name -> factory(hub) for concerns that are optional or added later (Jobs); each registers its own routes.
DEFAULT_EXTENSIONS: dict[str, Callable[[LoopbackHub], Any]] = {}


def _unsupported(message: str) -> Callable[[Request], Any]:
    def handler(req: Request) -> Any:
        raise HubError(501, message)

    return handler


class LoopbackHub(HubServer):
    """In-memory Hugging Face Hub on a random loopback port, served from a background thread.

    Use as a context manager (or `start()` / `stop()`). Tests register users and tokens with `add_user` /
    `add_token`, publish source repos with `seed_repo`, and read what a client pushed with `repo_files`.
    `fail_next` makes the next matching requests answer an HTTP error, to test retries.
    """

    def __init__(
        self,
        *,
        tree_page_size: int = 1000,
        max_body_bytes: int = 256 * 2**20,
        lfs_threshold: int = DEFAULT_LFS_THRESHOLD,
        extensions: Mapping[str, Callable[[LoopbackHub], Any]] | None = None,
    ) -> None:
        super().__init__(max_body_bytes=max_body_bytes)
        self.tree_page_size = tree_page_size
        self.auth = Auth(self)
        self.store = Repos(self, self.auth)
        self.lfs = Lfs(self, self.store, threshold=lfs_threshold)
        self.store.lfs = self.lfs
        self.files = Files(self.store, tree_page_size=tree_page_size)
        no_xet = "Xet storage cannot be served by the loopback hub: set HF_HUB_DISABLE_XET=1 (LFS is served)"
        for kind in ("write", "read"):
            self.add_route("GET", f"/api/models/{{ns}}/{{name}}/xet-{kind}-token/{{rest...}}", _unsupported(no_xet))
        self.datasets = DatasetRepos(self)
        self.oauth = OAuth(self)
        self.extensions: dict[str, Any] = {
            name: factory(self) for name, factory in {**DEFAULT_EXTENSIONS, **(extensions or {})}.items()
        }
        for method in ("GET", "POST", "PUT"):
            self.add_route(
                method,
                "/{ns}/{name}.git/{rest...}",
                _unsupported("git transfers are not supported by the loopback hub"),
            )

    def token_name(self, token: str) -> str:
        """The display name `token_log` records for `token`."""
        with self._lock:
            return self.auth.tokens[token].display_name

    def token_from_header(self, authorization: str | None) -> Token | None:
        with self._lock:
            return self.auth.from_header(authorization)

    def start(self) -> LoopbackHub:
        super().start()
        self.lfs.start()
        return self

    def stop(self) -> None:
        self.lfs.stop()
        super().stop()

    def __enter__(self) -> LoopbackHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ accounts

    def add_user(
        self, name: str, token: str, can_write: bool = True, orgs: Iterable[str] | Mapping[str, str] = ()
    ) -> None:
        """Register `name` with a classic token ("write" or "read") and org memberships.

        `orgs` is a list of org names (role "write") or a mapping org -> roleInOrg ("admin", "write",
        "contributor", "read").
        """
        with self._lock:
            self.auth.add_user(name, token, can_write, orgs)

    def add_token(
        self, user: str, token: str, *, role: str = "write", scoped: Mapping[str, Iterable[str]] | None = None
    ) -> None:
        """Add a token for an existing user; `role="fineGrained"` takes `scoped` {entity: permissions}."""
        with self._lock:
            self.auth.add_token(user, token, role=role, scoped=scoped)

    # ------------------------------------------------------------------ repos

    def seed_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes | Path],
        gated: bool | None = None,
        private: bool | None = None,
        message: str = "seed",
    ) -> str:
        """Create (or add a commit to) a model repo directly in the store; returns the new head commit sha.

        `gated` / `private` default to False for a new repo and are left as they are for an existing one. Files
        the Hub would keep in LFS (`.safetensors`, large files) are stored as LFS objects, so downloads take the
        client's LFS path.
        """
        contents = {path: Path(v).read_bytes() if isinstance(v, Path) else bytes(v) for path, v in files.items()}
        with self._lock:
            repo = self.store.repos.get(repo_id) or self.store.new_repo(repo_id, private=bool(private))
            if gated is not None:
                repo.gated = gated
            if private is not None:
                repo.private = private
            head = repo.commits[repo.branches["main"]]
            lfs = set(head.lfs) - set(contents)
            for path, data in contents.items():
                if self.store.lfs_mode(head, path, len(data)):
                    lfs.add(path)
                    self.lfs.objects[sha256_hex(data)] = data
                    repo.lfs_oids.add(sha256_hex(data))
            files_at_head = {**head.files, **contents}
            return self.store.add_commit(repo, "main", message, "", files_at_head, head.oid, frozenset(lfs)).oid

    def seed_dataset(self, repo_id: str, files: Mapping[str, bytes | Path]) -> str:
        """Publish a public dataset repo `repo_id` (plain data files, no loading script); returns its head sha."""
        return self.seed_repo(DATASET_PREFIX + repo_id, files)

    def grant_access(self, repo_id: str, user: str) -> None:
        """Accept the licence of a gated repo on behalf of `user`."""
        with self._lock:
            self.store.repos[repo_id].granted.add(user)

    def repo_files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """{path: content} at `revision`; LFS files give their content, not their pointer."""
        with self._lock:
            return dict(self.store.resolve(self.store.repos[repo_id], revision).files)

    def lfs_paths(self, repo_id: str, revision: str = "main") -> set[str]:
        """Paths stored as LFS objects at `revision`."""
        with self._lock:
            return set(self.store.resolve(self.store.repos[repo_id], revision).lfs)

    def repo_exists(self, repo_id: str) -> bool:
        with self._lock:
            return repo_id in self.store.repos

    def repo_private(self, repo_id: str) -> bool:
        with self._lock:
            return self.store.repos[repo_id].private

    def head(self, repo_id: str, branch: str = "main") -> str:
        with self._lock:
            return self.store.repos[repo_id].branches[branch]

    def commit_titles(self, repo_id: str, branch: str = "main") -> list[str]:
        """Commit titles from the head of `branch` back to the initial commit."""
        with self._lock:
            repo = self.store.repos[repo_id]
            titles, oid = [], repo.branches[branch]
            while oid is not None:
                commit = repo.commits[oid]
                titles.append(commit.title)
                oid = commit.parent
            return titles
