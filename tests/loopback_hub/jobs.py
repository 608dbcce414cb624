"""Hugging Face Jobs on the loopback Hub: each job's command runs as a local subprocess.

Serves what the installed huggingface_hub calls (`hf_api.py`: `list_jobs_hardware`, `run_job`, `list_jobs`,
`inspect_job`, `fetch_job_logs`, `cancel_job`), with the same paths and JSON shapes:

    GET  /api/jobs/hardware                      the flavors (HARDWARE below)
    POST /api/jobs/{namespace}                   start: the job spec (`command`, `environment`, `secrets`, ...)
    GET  /api/jobs/{namespace}                   list, filtered by `stage=` and `label=key=value`
    GET  /api/jobs/{namespace}/{job_id}          one job's JobInfo
    GET  /api/jobs/{namespace}/{job_id}/logs     the log so far as server-sent events, then the stream ends
    POST /api/jobs/{namespace}/{job_id}/cancel

As the real Jobs does, the command runs with the spec's `environment` and its `secrets` as environment variables,
on top of the test's own environment minus any token (so a token can only reach the job as a secret), with this
interpreter's bin folder first on PATH and `PIP_NO_INDEX=1`: a `pip install hc-smoe-hub==<version>` is satisfied
offline by the package under test. The client re-requests the log until the job's stage is terminal, so answering
with what is there now is enough. `submitted` keeps every spec as received, for assertions.

    hub = LoopbackHub(extensions={"jobs": Jobs})
    hub.extensions["jobs"].deny("bob")       # bob's account cannot run Jobs (not PRO, no payment method)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .auth import WRITE_ORG_ROLES, oid24
from .server import Answer, HubError, Request

if TYPE_CHECKING:
    from .hub import LoopbackHub


def _hw(name: str, pretty: str, cpu: str, ram: str, disk: str, usd_hour: float,
        gpu: tuple[str, int, int] | None = None) -> dict[str, Any]:
    """One hardware entry as the Hub lists it; `gpu` is (model, count, total VRAM in GB)."""
    entry: dict[str, Any] = {
        "name": name, "prettyName": pretty, "cpu": cpu, "ram": ram, "ephemeralStorage": disk,
        "unitCostMicroUSD": round(usd_hour / 60 * 1e6), "unitCostUSD": usd_hour / 60, "unitLabel": "minute",
    }
    if gpu:
        entry["accelerator"] = {"type": "gpu", "model": gpu[0], "quantity": str(gpu[1]), "vram": f"{gpu[2]} GB",
                                "manufacturer": "Nvidia"}
    return entry


# A plausible subset of the Hub's flavors (names from huggingface_hub's JobHardware; prices per hour as the Hub's
# pricing page listed them). Test data: tests assert choices relative to this table, not the real prices.
HARDWARE = [
    _hw("cpu-basic", "CPU Basic", "2 vCPU", "16 GB", "50 GB", 0.01),
    _hw("cpu-upgrade", "CPU Upgrade", "8 vCPU", "32 GB", "50 GB", 0.03),
    _hw("t4-small", "Nvidia T4 - small", "4 vCPU", "15 GB", "50 GB", 0.40, ("T4", 1, 16)),
    _hw("l4x1", "1x Nvidia L4", "8 vCPU", "30 GB", "400 GB", 0.80, ("L4", 1, 24)),
    _hw("a10g-large", "Nvidia A10G - large", "12 vCPU", "46 GB", "200 GB", 1.50, ("A10G", 1, 24)),
    _hw("l40sx1", "1x Nvidia L40S", "8 vCPU", "62 GB", "380 GB", 1.80, ("L40S", 1, 48)),
    _hw("a100-large", "Nvidia A100 - large", "12 vCPU", "142 GB", "1000 GB", 2.50, ("A100", 1, 80)),
    _hw("h200", "1x Nvidia H200", "23 vCPU", "256 GB", "3000 GB", 5.00, ("H200", 1, 141)),
    _hw("l40sx4", "4x Nvidia L40S", "48 vCPU", "382 GB", "3000 GB", 8.30, ("L40S", 4, 192)),
    _hw("h200x8", "8x Nvidia H200", "184 vCPU", "2048 GB", "20000 GB", 40.00, ("H200", 8, 1128)),
]
TERMINAL = ("COMPLETED", "CANCELED", "ERROR", "DELETED")
TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class Job:
    id: str
    namespace: str
    spec: dict[str, Any]
    created: float
    workdir: Path
    stage: str = "RUNNING"
    message: str | None = None
    logs: list[tuple[float, str]] = field(default_factory=list)
    process: subprocess.Popen[str] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def info(self) -> dict[str, Any]:
        with self.lock:
            stage, message = self.stage, self.message
        return {
            "id": self.id, "createdAt": _iso(self.created), "dockerImage": self.spec.get("dockerImage"),
            "spaceId": self.spec.get("spaceId"), "command": self.spec.get("command"), "arguments": [],
            "environment": self.spec.get("environment") or {},
            "secrets": {name: "<encrypted>" for name in self.spec.get("secrets") or {}},
            "flavor": self.spec.get("flavor"), "labels": self.spec.get("labels") or {},
            "status": {"stage": stage, "message": message},
            "owner": {"id": oid24(self.namespace), "name": self.namespace, "type": "user"},
        }


class Jobs:
    """The Jobs concern: routes, the job table and the subprocesses."""

    def __init__(self, hub: LoopbackHub) -> None:
        self.hub = hub
        self.jobs: dict[str, Job] = {}
        self.submitted: list[dict[str, Any]] = []
        self.denied: set[str] = set()
        self.held = False
        self.root = Path(tempfile.mkdtemp(prefix="loopback-jobs-"))
        hub.add_route("GET", "/api/jobs/hardware", lambda req: Answer.json(HARDWARE))
        hub.add_route("POST", "/api/jobs/{ns}", self._run)
        hub.add_route("GET", "/api/jobs/{ns}", self._list)
        hub.add_route("GET", "/api/jobs/{ns}/{job_id}", lambda req: Answer.json(self._job(req).info()))
        hub.add_route("GET", "/api/jobs/{ns}/{job_id}/logs", self._logs)
        hub.add_route("POST", "/api/jobs/{ns}/{job_id}/cancel", self._cancel)
        # whoami tells whether an account may run Jobs the way the Hub does: isPro / canPay.
        original = hub.auth.whoami_payload

        def whoami_payload(token: Any) -> dict[str, Any]:
            payload = original(token)
            payload["isPro"] = payload["canPay"] = payload["name"] not in self.denied
            return payload

        hub.auth.whoami_payload = whoami_payload  # type: ignore[method-assign]

    def deny(self, namespace: str) -> None:
        """`namespace` may not run Jobs: the Hub answers 402, and whoami says neither PRO nor able to pay."""
        self.denied.add(namespace)

    def hold(self) -> None:
        """Jobs started from now on stay RUNNING, with their command not run, until cancelled: a test of what the
        client does while a job runs cannot then race the job to its end."""
        self.held = True

    def wait(self, job_id: str, timeout: float = 120) -> str:
        """Block until the job's stage is terminal; its stage."""
        job, deadline = self.jobs[job_id], time.monotonic() + timeout
        while time.monotonic() < deadline:
            with job.lock:
                if job.stage in TERMINAL:
                    return job.stage
            time.sleep(0.05)
        raise TimeoutError(f"job {job_id} still {job.stage} after {timeout}s")

    def log_text(self, job_id: str) -> str:
        job = self.jobs[job_id]
        with job.lock:
            return "\n".join(line for _, line in job.logs)

    def close(self) -> None:
        for job in self.jobs.values():
            if job.process is not None and job.process.poll() is None:
                job.process.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ routes

    def _authorize(self, req: Request) -> str:
        namespace, token = req.params["ns"], req.token
        if token is None:
            raise HubError(401, "Jobs need a token")
        if not self.hub.auth.member(token.user, namespace, WRITE_ORG_ROLES):
            raise HubError(403, f"{token.user} cannot run Jobs in {namespace}")
        if token.role == "read" or (token.role == "fineGrained"
                                    and "job.write" not in token.scoped.get(namespace, [])):
            raise HubError(403, "this token may not manage Jobs")
        if namespace in self.denied:
            raise HubError(402, "Jobs are available to PRO users and organisations with a payment method")
        return namespace

    def _job(self, req: Request) -> Job:
        namespace = self._authorize(req)
        job = self.jobs.get(req.params["job_id"])
        if job is None or job.namespace != namespace:
            raise HubError(404, f"job {req.params['job_id']} not found")
        return job

    def _run(self, req: Request) -> Answer:
        namespace = self._authorize(req)
        spec = req.json()
        if not isinstance(spec.get("command"), list) or not spec["command"]:
            raise HubError(400, "command must be a non-empty list")
        if spec.get("flavor") not in {hw["name"] for hw in HARDWARE}:
            raise HubError(400, f"unknown flavor {spec.get('flavor')!r}")
        self.submitted.append(json.loads(json.dumps(spec)))
        job_id = uuid.uuid4().hex[:24]
        job = Job(job_id, namespace, spec, time.time(), self.root / job_id)
        job.workdir.mkdir()
        self.jobs[job_id] = job
        self._start(job)
        return Answer.json(job.info())

    def _list(self, req: Request) -> Answer:
        namespace = self._authorize(req)
        stages = set(req.query.get("stage", []))
        labels = dict(item.split("=", 1) for item in req.query.get("label", []) if "=" in item)
        found = []
        for job in self.jobs.values():
            info = job.info()
            if job.namespace != namespace or (stages and info["status"]["stage"] not in stages):
                continue
            if all(info["labels"].get(k) == v for k, v in labels.items()):
                found.append(info)
        return Answer.json(found)

    def _logs(self, req: Request) -> Answer:
        job = self._job(req)
        with job.lock:
            lines = list(job.logs)
        body = "".join(f"data: {json.dumps({'data': text, 'timestamp': _iso(ts)})}\n\n" for ts, text in lines)
        return Answer(200, body.encode(), {"Content-Type": "text/event-stream"})

    def _cancel(self, req: Request) -> Answer:
        job = self._job(req)
        with job.lock:
            if job.stage not in TERMINAL:
                job.stage = "CANCELED"
                if job.process is not None:
                    job.process.terminate()
        return Answer.json({})

    # ------------------------------------------------------------------ running

    def _start(self, job: Job) -> None:
        if self.held:
            job.logs.append((time.time(), "held by the loopback Hub until cancelled"))
            return
        env = {k: v for k, v in os.environ.items() if k not in TOKEN_VARS}
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        env["PIP_NO_INDEX"] = "1"  # the package under test satisfies the job's install, with no network
        env.update({k: str(v) for k, v in (job.spec.get("environment") or {}).items()})
        env.update({k: str(v) for k, v in (job.spec.get("secrets") or {}).items()})
        job.process = subprocess.Popen(job.spec["command"], cwd=job.workdir, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                       start_new_session=True)
        timeout = job.spec.get("timeoutSeconds")
        threading.Thread(target=self._watch, args=(job, timeout), daemon=True, name=f"job-{job.id}").start()

    def _watch(self, job: Job, timeout: int | None) -> None:
        assert job.process is not None and job.process.stdout is not None
        if timeout:
            timer = threading.Timer(timeout, self._time_out, args=(job,))
            timer.daemon = True
            timer.start()
        for line in job.process.stdout:
            with job.lock:
                job.logs.append((time.time(), line.rstrip("\n")))
        code = job.process.wait()
        with job.lock:
            if job.stage == "RUNNING":
                job.stage = "COMPLETED" if code == 0 else "ERROR"
                job.message = None if code == 0 else f"exit code {code}"

    def _time_out(self, job: Job) -> None:
        with job.lock:
            if job.stage == "RUNNING" and job.process is not None:
                job.stage, job.message = "ERROR", "Job timeout"
                job.process.kill()
