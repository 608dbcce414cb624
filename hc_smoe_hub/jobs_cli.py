"""The terminal side of `hc-smoe-push --on-jobs`: show the plan, ask, submit, stream the job's log, say the outcome.

Part of the CLI (it prints); the checks and the job itself are jobs_submit.py's. Ctrl-C while the log streams
detaches: the job keeps running on the Hub and the lines printed say how to follow or cancel it.
"""

from __future__ import annotations

import argparse
import sys

from hc_smoe_hub import hub_jobs, jobs_flavor
from hc_smoe_hub.errors import HcSmoeError
from hc_smoe_hub.jobs_submit import JobsPlan, plan_on_jobs, repo_url, submit


def add_options(parser: argparse.ArgumentParser) -> None:
    j = parser.add_argument_group("Hugging Face Jobs (run the same job on the Hub's GPUs, billed to your account)")
    j.add_argument("--on-jobs", action="store_true",
                   help="submit this job to Hugging Face Jobs instead of running it here; it must push")
    j.add_argument("--flavor", help="Jobs hardware, e.g. a100-large (default: the cheapest that holds the job)")
    j.add_argument("--timeout", help="stop the job after this long, e.g. 90m or 3h (default: twice the estimate)")
    j.add_argument("-y", "--yes", action="store_true", help="submit without asking for confirmation")


def run_on_jobs(args: argparse.Namespace, argv: list[str], parser: argparse.ArgumentParser) -> int:
    plan = plan_on_jobs(args, argv, parser)
    print(describe(plan))
    if not args.yes:
        if not sys.stdin.isatty():
            raise HcSmoeError("not submitting without confirmation: pass --yes to submit from a script")
        if input("Submit? [y/N] ").strip().lower() not in ("y", "yes"):
            print("not submitted")
            return 1
    job = submit(plan)
    print(f"job {job.id} submitted: {job.url}", flush=True)
    try:
        for line in hub_jobs.follow_logs(job.id, plan.namespace, plan.token):
            print(line, flush=True)
        final = hub_jobs.inspect(job.id, plan.namespace, plan.token)
    except KeyboardInterrupt:
        print(f"\ndetached: job {job.id} keeps running on Hugging Face Jobs (billed until it ends)\n"
              f"  follow it: hf jobs logs -f {job.id}\n"
              f"  cancel it: hf jobs cancel {job.id}", file=sys.stderr)
        return 130
    if final.stage != "COMPLETED":
        why = f": {final.message}" if final.message else ""
        raise HcSmoeError(f"job {job.id} ended {final.stage}{why}; its log: hf jobs logs {job.id} ({final.url})")
    print(f"pushed to {repo_url(plan.repo_id)}")
    print(f"job: {job.id} ({job.url})")
    return 0


def describe(plan: JobsPlan) -> str:
    f = plan.flavor
    gpus = f"{f.gpus} x {f.gpu_model} ({f.gpu_bytes / 1e9:.0f} GB each)" if f.gpus else "no GPU"
    cost = plan.usd_per_hour * plan.estimate_s / 3600
    return "\n".join([
        f"Hugging Face Jobs: {f.name} ({f.pretty_name}; {gpus}, {f.disk_bytes / 1e9:.0f} GB disk) at "
        f"${plan.usd_per_hour:.2f}/hour",
        f"  the job needs {plan.need.describe()}",
        f"  estimated time {jobs_flavor.format_duration(plan.estimate_s)} (rough; about ${cost:.2f}), "
        f"stopped after {jobs_flavor.format_duration(plan.spec.timeout_s)}",
        f"  runs in {plan.namespace}'s account and pushes to {repo_url(plan.repo_id)}",
    ])
