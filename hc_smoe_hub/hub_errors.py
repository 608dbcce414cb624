"""What a failed Hub call means for the user: one line per failure that says what to do, with the token scrubbed.

`hub.py` and `hub_jobs.py` make the calls; this module only reads the exceptions huggingface_hub and httpx raise.
"""

from __future__ import annotations

from typing import NoReturn

import httpx2
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hc_smoe_hub.errors import HubAccessError, SourceError

TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def push_error(message: str, detail: str) -> HubAccessError:
    """The CLI's message names a local folder and a command; `detail` is the failure alone (the Space shows it)."""
    error = HubAccessError(message)
    error.detail = detail  # type: ignore[attr-defined]
    return error


def raise_whoami_error(exc: Exception, token: str, endpoint: str) -> NoReturn:
    status = http_status(exc)
    if status == 401:
        message = (
            f"the Hugging Face token was rejected by {endpoint} (invalid, expired or revoked): create one "
            f"on {endpoint}/settings/tokens, then run `hf auth login` or set HF_TOKEN"
        )
    elif status == 429:
        message = f"{endpoint} is rate-limiting token checks: wait a minute and try again"
    elif isinstance(exc, OfflineModeIsEnabled):
        message = "HF_HUB_OFFLINE is set: unset it to push to the Hub, or pass --no-push"
    elif isinstance(exc, HfHubHTTPError):
        message = f"could not check the token with {endpoint}: {describe(exc)}"
    elif isinstance(exc, httpx2.TransportError | ConnectionError | TimeoutError):
        message = (
            f"cannot reach {endpoint} to check the token ({describe(exc)}): check the network or HF_ENDPOINT"
        )
    else:
        raise exc
    raise HubAccessError(scrub(message, token)) from None


def raise_download_error(
    exc: Exception, repo_id: str, revision: str | None, token: str | None, endpoint: str
) -> NoReturn:
    hub_url = f"{endpoint}/{repo_id}"
    if isinstance(exc, GatedRepoError):  # before RepositoryNotFoundError: it is a subclass of it
        message = (
            f"{repo_id} is gated: accept its licence on {hub_url} and use a token of an account that "
            "has access"
        )
    elif isinstance(exc, RevisionNotFoundError):
        message = f"revision {revision!r} not found in {repo_id}: pass an existing branch, tag or commit sha"
    elif isinstance(exc, RepositoryNotFoundError):
        message = (
            f"model repo {repo_id} not found on the Hub (or it is private: pass a token that can read it)"
        )
    elif http_status(exc) == 401:
        message = (
            f"the Hugging Face token was rejected by {endpoint} (invalid, expired or revoked): fix "
            "HF_TOKEN / `hf auth login`, or pass no token for a public repo"
        )
    elif isinstance(exc, OfflineModeIsEnabled) or (
        isinstance(exc, LocalEntryNotFoundError) and isinstance(exc.__cause__, OfflineModeIsEnabled)
    ):
        message = (
            f"HF_HUB_OFFLINE is set, so {repo_id} cannot be downloaded: unset it, or pass the local "
            "directory of a downloaded copy"
        )
    elif isinstance(exc, LocalEntryNotFoundError | httpx2.TransportError | ConnectionError | TimeoutError):
        # snapshot_download reports a connection failure with no cached copy as LocalEntryNotFoundError.
        message = (
            f"cannot reach {endpoint} to download {repo_id} ({describe(exc.__cause__ or exc)}): check "
            "the network, proxy or HF_ENDPOINT, or pass a local model directory"
        )
    elif isinstance(exc, HfHubHTTPError):
        message = f"the Hub answered {describe(exc)} while downloading {repo_id}: try again later"
    else:
        raise exc
    raise SourceError(scrub(message, token)) from None


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, OfflineModeIsEnabled):
        return False
    if isinstance(exc, HfHubHTTPError):
        return http_status(exc) in TRANSIENT_STATUS
    return isinstance(exc, httpx2.TransportError | ConnectionError | TimeoutError)


def http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None) if isinstance(exc, HfHubHTTPError) else None


def describe(exc: BaseException) -> str:
    """`HTTP 503: <server message>` or `ConnectError: <first line>`, on one line."""
    status = http_status(exc)
    if status is not None:
        server = getattr(exc, "server_message", None) or ""
        return f"HTTP {status}" + (f": {one_line(server)}" if server else "")
    return f"{type(exc).__name__}: {one_line(exc)}"


def one_line(value: object) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= 300 else text[:297] + "..."


def scrub(message: str, token: str | None) -> str:
    return message.replace(token, "***") if token else message
