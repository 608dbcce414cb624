"""Everything that talks to the Hugging Face Hub: token lookup, push pre-flight, source download, upload.

This is the only module of the package that makes network calls through `huggingface_hub`; the rest of the
package works on local directories. Every failure the user can act on becomes one line in an `HcSmoeError`
(`HubAccessError` for pushing, `SourceError` for downloading) and no message ever contains the token.

The Hub endpoint is read from `HF_ENDPOINT` when each function is called and handed to `HfApi(endpoint=...)`
and `snapshot_download(endpoint=...)` explicitly. `huggingface_hub` itself freezes `HF_ENDPOINT` into
`constants.ENDPOINT` at import time, so relying on its default would ignore an endpoint set after the first
import (tests point it at a loopback server this way).

    repo_id = check_push_access(args.repo_id, token=args.token, default_name="Mixtral-4e", overwrite=False,
                                private=False)       # before any compute
    src_dir, sha = download_source("org/model", revision=None, token=args.token)
    url = push_folder(out_dir, repo_id, token=args.token, private=False, commit_message="Add merged model")
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    HFValidationError,
    OIDCError,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import get_token, validate_repo_id
from tqdm.auto import tqdm

from hc_smoe_hub import __version__
from hc_smoe_hub.errors import HubAccessError, OutputError, SourceError
from hc_smoe_hub.hub_errors import (
    describe,
    is_transient,
    one_line,
    push_error,
    raise_download_error,
    raise_whoami_error,
    scrub,
)

log = logging.getLogger(__name__)

NO_TOKEN_MESSAGE = "no Hugging Face token: run `hf auth login` or set HF_TOKEN (a token with write access)"

# What the merge engine reads from a source repo. Remote code (*.py) is deliberately left out: the engine
# never executes it, and downloading it would only invite `trust_remote_code` further down.
SOURCE_ALLOW_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "tokenizer*",
    "*.model",
    "*.tiktoken",
    "merges.txt",
    "vocab*",
    # Chat templates: transformers 5 keeps them in chat_template.jinja, not in tokenizer_config.json.
    "*.jinja",
    "LICENSE*",
    "README.md",
]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files a new Hub repo is created with: a repo holding only these is still "empty" for the overwrite check.
CREATION_FILES = frozenset({".gitattributes"})


def hub_endpoint() -> str:
    """The Hub URL this process talks to: `HF_ENDPOINT` as set now, else huggingface_hub's default."""
    return os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or constants.ENDPOINT


def resolve_token(token: str | None) -> str | None:
    """The token to use: the explicit one, else `HF_TOKEN`, else the stored `hf auth login` token."""
    if token and token.strip():
        return token.strip()
    env = os.environ.get("HF_TOKEN", "").strip()
    if env:
        return env
    try:
        return get_token()
    except OIDCError as exc:  # HF_OIDC_RESOURCE set but the exchange failed: get_token raises instead of None
        raise HubAccessError(
            f"HF_OIDC_RESOURCE is set but no token could be obtained: {one_line(exc)}"
        ) from None


def check_push_access(
    repo_id: str | None,
    *,
    token: str | None,
    default_name: str,
    overwrite: bool,
    private: bool,
) -> str:
    """Refuse early (before any compute) a push that would fail; return the fully qualified target repo id.

    Checks that there is a token, that the Hub accepts it, that it may write (classic "write" role, or a
    fine-grained token with `repo.write` on the target namespace or repo), that the namespace is the user or
    one of their organisations where they may write, and that an existing target is empty unless `overwrite`.
    """
    token = resolve_token(token)
    if token is None:
        raise HubAccessError(NO_TOKEN_MESSAGE)
    endpoint = hub_endpoint()
    api = _api(token)
    try:
        info = api.whoami(token=token)
    except Exception as exc:
        raise_whoami_error(exc, token, endpoint)

    user = str(info.get("name") or "")
    if info.get("type") == "org" or not user:
        raise HubAccessError(
            "this is an organisation token: use the personal token of a member with write access"
        )
    access = (info.get("auth") or {}).get("accessToken") or {}
    role = access.get("role")
    settings = f"{endpoint}/settings/tokens"
    if role == "read":
        raise HubAccessError(
            f"the token of {user} is read-only: create a token with write access on {settings}"
        )
    fine_grained_writable: set[str] | None = None
    if role == "fineGrained":
        fine_grained_writable = _fine_grained_writable(access)
        if not fine_grained_writable:
            raise HubAccessError(
                f"the fine-grained token of {user} has no repo.write permission: add it on {settings}"
            )
    elif role != "write":
        # OAuth and other token kinds do not say what they may do: let the Hub decide at push time.
        log.debug("token kind %r does not state its permissions; not checking write access up front", role)

    target = repo_id.strip() if repo_id else f"{user}/{default_name}"
    if "/" not in target:
        target = f"{user}/{target}"
    try:
        validate_repo_id(target)
    except HFValidationError as exc:
        raise HubAccessError(f"{target!r} is not a valid Hub repo id: {one_line(exc)}") from None
    namespace = target.split("/", 1)[0]

    orgs = {str(org.get("name")): str(org.get("roleInOrg") or "") for org in info.get("orgs") or []}
    if namespace != user:
        if namespace not in orgs:
            known = ", ".join([user, *sorted(orgs)])
            raise HubAccessError(
                f"{user} cannot create repos under {namespace!r}: use your own namespace or an organisation "
                f"you belong to ({known})"
            )
        if orgs[namespace] == "read":
            raise HubAccessError(
                f"{user} has only read access in the organisation {namespace}: ask an admin for "
                "write access, or push to your own namespace"
            )
    if fine_grained_writable is not None and not ({namespace, target} & fine_grained_writable):
        raise HubAccessError(
            f"the fine-grained token of {user} cannot write to {namespace}: give it repo.write there "
            f"({settings})"
        )

    try:
        existing = api.model_info(target, token=token)
    except RepositoryNotFoundError:
        log.info(
            "push target %s does not exist yet: it will be created (%s)",
            target,
            "private" if private else "public",
        )
        return target
    except Exception as exc:
        raise HubAccessError(
            scrub(f"could not check whether {target} exists on {endpoint}: {describe(exc)}", token)
        ) from exc

    files = sorted(s.rfilename for s in existing.siblings or [] if s.rfilename not in CREATION_FILES)
    if files and not overwrite:
        shown = ", ".join(files[:3]) + (", ..." if len(files) > 3 else "")
        raise HubAccessError(
            f"{target} already exists and holds {len(files)} file(s) ({shown}): pass --overwrite to replace "
            "its contents, or choose another --repo-id"
        )
    if files:
        log.warning(
            "%s already holds %d file(s): --overwrite given, they will be replaced", target, len(files)
        )
    if existing.private is not None and bool(existing.private) != private:
        log.warning(
            "%s exists and is %s: its visibility is left as it is",
            target,
            "private" if existing.private else "public",
        )
    return target


def source_summary(repo_id: str, *, revision: str | None, token: str | None) -> tuple[dict[str, Any], int]:
    """(config.json, bytes of safetensors weights) of a Hub model, without downloading the weights.

    An unsupported model, a wrong --keep or a model too large for the machine is refused from these alone.
    """
    import json

    from huggingface_hub import hf_hub_download

    token = resolve_token(token)
    endpoint = hub_endpoint()
    try:
        info = _api(token).model_info(repo_id, revision=revision, token=token or False, files_metadata=True)
        size = sum(s.size or 0 for s in info.siblings or [] if s.rfilename.endswith(".safetensors"))
        path = hf_hub_download(repo_id, "config.json", revision=info.sha or revision, token=token or False,
                               endpoint=endpoint)
        return json.loads(Path(path).read_text()), size
    except ValueError:
        raise SourceError(f"the config.json of {repo_id} is not valid JSON") from None
    except Exception as exc:
        raise_download_error(exc, repo_id, revision, token, endpoint)


def fetch_config(repo_id: str, *, revision: str | None, token: str | None) -> dict[str, Any]:
    """Only the source's config.json, so an unsupported model or a wrong --keep is refused before the download."""
    return source_summary(repo_id, revision=revision, token=token)[0]


def download_source(
    repo_id: str,
    *,
    revision: str | None,
    token: str | None,
    cache_dir: str | None = None,
    progress: bool = True,
) -> tuple[Path, str]:
    """Download what the merge engine needs from a Hub model repo; return (local snapshot dir, commit sha).

    Only safetensors weights, JSON configs, tokenizer files, chat templates, licence and README are fetched
    (see `SOURCE_ALLOW_PATTERNS`). The file list is checked first, so a pickle-only repo is refused before
    anything large is downloaded.
    """
    token = resolve_token(token)
    endpoint = hub_endpoint()
    api = _api(token)
    at = f" at revision {revision}" if revision else ""
    try:
        info = api.model_info(repo_id, revision=revision, token=token or False)
        sha = info.sha
        if not sha:
            raise SourceError(f"the Hub at {endpoint} gave no commit sha for {repo_id}{at}: try again")
        _check_source_files(repo_id + at, [s.rfilename for s in info.siblings or []])
        # Download by commit sha: the files are exactly the ones just checked, even if the branch moves.
        local = snapshot_download(
            repo_id,
            revision=sha,
            allow_patterns=SOURCE_ALLOW_PATTERNS,
            token=token or False,
            cache_dir=cache_dir,
            endpoint=endpoint,
            library_name="hc-smoe-hub",
            library_version=__version__,
            tqdm_class=None if progress else _SilentTqdm,
        )
    except SourceError:
        raise
    except Exception as exc:
        raise_download_error(exc, repo_id, revision, token, endpoint)
    log.info("source %s%s: commit %s in %s", repo_id, at, sha, local)
    return Path(local), sha


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    token: str | None,
    private: bool,
    commit_message: str,
    retries: int = 3,
    backoff_s: float = 2.0,
    delete_stale: bool = False,
) -> str:
    """Create `repo_id` if needed and upload `folder` into it; return the repo URL.

    Transient failures (HTTP 408/429/5xx, connection errors) are retried `retries` more times with exponential
    backoff from `backoff_s`; a re-run skips files the Hub already has. With `delete_stale` (meant for
    `--overwrite`) remote files that are not in `folder` are removed in the same commit, except
    `.gitattributes`, so an overwritten repo keeps no shards of an older checkpoint; without it the upload
    only adds and replaces files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise OutputError(f"{folder} is not a directory: there is nothing to push")
    resume = f"hc-smoe-push --push-only {folder} --repo-id {repo_id}"
    token = resolve_token(token)
    if token is None:
        raise HubAccessError(NO_TOKEN_MESSAGE)
    endpoint = hub_endpoint()
    api = _api(token)
    attempts = max(0, retries) + 1
    for attempt in range(1, attempts + 1):
        try:
            url = api.create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message,
                token=token,
                repo_type="model",
                delete_patterns="*" if delete_stale else None,
                # The run's own log (local paths, library chatter) and any leftover temporary file stay local.
                ignore_patterns=["run.log", ".*", ".*/**"],
            )
        except Exception as exc:
            cause = scrub(describe(exc), token)
            if not is_transient(exc):
                detail = f"pushing to {repo_id} on {endpoint} failed: {cause}"
                raise push_error(f"{detail}; fix that and run `{resume}`", detail) from exc
            if attempt == attempts:
                detail = f"pushing to {repo_id} on {endpoint} failed {attempts} times ({cause})"
                raise push_error(
                    f"{detail}; the merged model is safe in {folder}: run `{resume}` to try again", detail
                ) from exc
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning(
                "push to %s failed (%s), retrying in %.0fs (attempt %d of %d)",
                repo_id,
                cause,
                delay,
                attempt + 1,
                attempts,
            )
            time.sleep(delay)
            continue
        log.info("pushed %s to %s (commit %s)", folder, url, getattr(commit, "oid", "?"))
        return str(url)
    raise AssertionError("unreachable: the loop returns or raises")  # keeps type checkers honest


# ---------------------------------------------------------------------------- helpers


class _SilentTqdm(tqdm):
    """A progress bar that never shows.

    A plain `tqdm` subclass on purpose: for subclasses of its own tqdm, huggingface_hub overrides `disable`
    from its global progress-bar settings.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def _api(token: str | None) -> HfApi:
    return HfApi(
        endpoint=hub_endpoint(), token=token or False, library_name="hc-smoe-hub", library_version=__version__
    )


def _fine_grained_writable(access: dict[str, Any]) -> set[str]:
    """Entities (user, org or repo id) a fine-grained token holds `repo.write` on, from whoami-v2."""
    scoped = (access.get("fineGrained") or {}).get("scoped") or []
    return {
        str((item.get("entity") or {}).get("name"))
        for item in scoped
        if "repo.write" in (item.get("permissions") or [])
    }


def _check_source_files(label: str, files: Iterable[str]) -> None:
    names = list(files)
    if any(name.endswith(".safetensors") for name in names):
        if "config.json" not in names:
            raise SourceError(f"{label} has no config.json at its root: it is not a transformers model repo")
        return
    pickles = [name for name in names if name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise SourceError(
            f"{label} has only pickle weights ({PurePosixPath(pickles[0]).name}); convert it to safetensors "
            "first (load it with transformers and save_pretrained, or use the Hub's convert-to-safetensors "
            "Space), then pass the converted repo or directory"
        )
    raise SourceError(f"{label} has no *.safetensors weights: it is not a checkpoint this tool can read")
