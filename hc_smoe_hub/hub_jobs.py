"""Hugging Face Jobs through huggingface_hub's own API: hardware, access, submit, follow, cancel.

The only module of the package that calls the Jobs part of `HfApi` (`list_jobs_hardware`, `run_job`,
`fetch_job_logs`, `inspect_job`, `list_jobs`, `cancel_job`); hub.py owns the rest of the client (tokens, push
access, downloads, uploads). The endpoint is `hub.hub_endpoint()`, read at call time as there. Every failure the
user can act on is one `JobsError` line, and no message ever contains the token.

    flavors = list_flavors(token)
    namespace = check_jobs_access(token)
    job = submit(JobSpecification(image=..., command=[...], secrets={"HF_TOKEN": token}, ...), token, namespace)
    for line in follow_logs(job.id, namespace, token): ...
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from huggingface_hub.errors import HfHubHTTPError

from hc_smoe_hub.errors import HcSmoeError
from hc_smoe_hub.hub import NO_TOKEN_MESSAGE, _api, hub_endpoint, resolve_token
from hc_smoe_hub.hub_errors import describe, scrub

log = logging.getLogger(__name__)

TERMINAL_STAGES = frozenset({"COMPLETED", "CANCELED", "ERROR", "DELETED"})
ACTIVE_STAGES = ("SCHEDULING", "RUNNING")
# What a price is quoted per, in the hardware list, as a factor to one hour.
_PER_HOUR = {"second": 3600.0, "minute": 60.0, "hour": 1.0}
_SIZE = re.compile(r"^\s*([\d.]+)\s*([KMGT]i?B)\s*$", re.IGNORECASE)
_UNITS = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


class JobsError(HcSmoeError):
    """Jobs cannot be used: no access, unknown flavor, a submission or a job the Hub refused."""


@dataclass(frozen=True)
class Flavor:
    """One entry of `list_jobs_hardware`, with its sizes in bytes and its price per hour in USD."""

    name: str
    pretty_name: str
    gpus: int
    gpu_model: str | None
    gpu_bytes: int  # memory of one GPU
    ram_bytes: int
    disk_bytes: int
    usd_per_hour: float

    @property
    def gpu_total_bytes(self) -> int:
        return self.gpus * self.gpu_bytes


@dataclass
class JobSpecification:
    image: str
    command: list[str]
    flavor: str
    timeout_s: int
    env: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class JobState:
    id: str
    namespace: str
    stage: str
    message: str | None
    url: str
    labels: dict[str, str]

    @property
    def finished(self) -> bool:
        return self.stage in TERMINAL_STAGES


def parse_size(text: str | None) -> int:
    """'24 GB' -> bytes (the hardware list's notation); 0 for 'N/A' or nothing."""
    match = _SIZE.match(text or "")
    return int(float(match[1]) * _UNITS[match[2].lower()]) if match else 0


def list_flavors(token: str | None) -> list[Flavor]:
    """The hardware Jobs offers, as `Flavor`s."""
    try:
        hardware = _api(token).list_jobs_hardware(token=token or False)
    except Exception as exc:
        raise JobsError(_failure("could not list the Jobs hardware", exc, token)) from None
    flavors = []
    for hw in hardware:
        acc = hw.accelerator
        count = int(acc.quantity) if acc is not None and str(acc.quantity).isdigit() else 0
        # The list quotes the flavor's total VRAM ("4 x 24 GB" machines say "96 GB").
        total = parse_size(acc.vram) if acc is not None else 0
        flavors.append(Flavor(
            name=hw.name, pretty_name=hw.pretty_name, gpus=count, gpu_model=acc.model if acc else None,
            gpu_bytes=total // count if count else 0, ram_bytes=parse_size(hw.ram),
            disk_bytes=parse_size(hw.ephemeral_storage),
            usd_per_hour=float(hw.unit_cost_usd) * _PER_HOUR.get(str(hw.unit_label).lower(), 1.0)))
    return flavors


def check_jobs_access(token: str | None, namespace: str | None = None) -> tuple[str, str]:
    """(token, namespace the job runs in) once the account is known to be able to run Jobs; else JobsError.

    A read token cannot start jobs, nor a fine-grained one without `job.write`; a personal namespace needs PRO or
    a payment method and an organisation a payment method, when whoami says so. Then the namespace's job list is
    asked for, which the Hub refuses to an account that may not use Jobs.
    """
    token = resolve_token(token)
    if token is None:
        raise JobsError(NO_TOKEN_MESSAGE)
    api = _api(token)
    try:
        info = api.whoami(token=token)
    except Exception as exc:
        raise JobsError(_failure("could not check the token", exc, token)) from None
    user = str(info.get("name") or "")
    access = (info.get("auth") or {}).get("accessToken") or {}
    namespace = namespace or user
    settings = f"{hub_endpoint()}/settings/tokens"
    if access.get("role") == "read":
        raise JobsError(f"the token of {user} is read-only and cannot start Jobs: create a write token on {settings}")
    if access.get("role") == "fineGrained":
        scoped = (access.get("fineGrained") or {}).get("scoped") or []
        if not any("job.write" in (s.get("permissions") or []) and (s.get("entity") or {}).get("name") == namespace
                   for s in scoped):
            raise JobsError(f"the fine-grained token of {user} may not start Jobs in {namespace}: give it the "
                            f"job.write permission on {settings}")
    billing = info if namespace == user else next(
        (org for org in info.get("orgs") or [] if org.get("name") == namespace), None)
    if billing is None:
        raise JobsError(f"{user} is not a member of {namespace!r}: run the job in your own namespace")
    # Only a plain "no" refuses: an OAuth token without the read-billing scope does not say.
    paid = ("isPro", "canPay") if namespace == user else ("canPay", "isEnterprise")
    if all(billing.get(key) is False for key in paid):
        raise JobsError(f"{namespace} cannot run Hugging Face Jobs: they need a PRO account or an organisation with "
                        f"a payment method ({hub_endpoint()}/pricing)")
    try:
        next(iter(api.list_jobs(namespace=namespace, token=token)), None)
    except Exception as exc:
        raise JobsError(_failure(f"{namespace} cannot run Hugging Face Jobs with this token", exc, token)) from None
    return token, namespace


def submit(spec: JobSpecification, token: str, namespace: str) -> JobState:
    """Start the job; its secrets travel in the request's `secrets`, which the Hub stores encrypted."""
    try:
        info = _api(token).run_job(image=spec.image, command=spec.command, env=spec.env, secrets=spec.secrets,
                                   flavor=spec.flavor, timeout=spec.timeout_s, labels=spec.labels,
                                   namespace=namespace, token=token)
    except Exception as exc:
        raise JobsError(_failure("the Hub did not start the job", exc, token)) from None
    return _state(info, namespace)


def follow_logs(job_id: str, namespace: str, token: str) -> Iterator[str]:
    """The job's log lines as they come, until the job ends."""
    api, seen = _api(token), 0
    try:
        for line in api.fetch_job_logs(job_id=job_id, namespace=namespace, follow=True, token=token):
            seen += 1
            yield line
        # The client stops at the first terminal stage it sees, which can come before the last lines it has not
        # fetched yet: one replay of the whole log gives the rest.
        for index, line in enumerate(api.fetch_job_logs(job_id=job_id, namespace=namespace, token=token)):
            if index >= seen:
                yield line
    except HfHubHTTPError as exc:
        raise JobsError(_failure(f"could not read the log of job {job_id}", exc, token)) from None


def inspect(job_id: str, namespace: str, token: str) -> JobState:
    try:
        return _state(_api(token).inspect_job(job_id=job_id, namespace=namespace, token=token), namespace)
    except Exception as exc:
        raise JobsError(_failure(f"could not read the state of job {job_id}", exc, token)) from None


def active_jobs(labels: dict[str, str], namespace: str, token: str) -> list[JobState]:
    """Jobs of `namespace` still scheduling or running that carry all `labels`."""
    try:
        infos = _api(token).list_jobs(status=list(ACTIVE_STAGES), labels=labels, namespace=namespace, token=token)
        return [_state(info, namespace) for info in infos]
    except Exception as exc:
        raise JobsError(_failure("could not list the running jobs", exc, token)) from None


def cancel(job_id: str, namespace: str, token: str) -> None:
    try:
        _api(token).cancel_job(job_id=job_id, namespace=namespace, token=token)
    except Exception as exc:
        raise JobsError(_failure(f"could not cancel job {job_id}", exc, token)) from None


def _state(info: Any, namespace: str) -> JobState:
    stage = getattr(info.status.stage, "value", info.status.stage)
    return JobState(info.id, namespace, str(stage), info.status.message, info.url, dict(info.labels or {}))


def _failure(what: str, exc: Exception, token: str | None) -> str:
    if isinstance(exc, JobsError):
        return str(exc)
    return scrub(f"{what}: {describe(exc)}", token)
