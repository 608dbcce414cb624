"""`hc-smoe-push ... --on-jobs`: the same job, run on Hugging Face Jobs in the user's namespace.

`plan_on_jobs` makes every check that needs no download locally, before anything is submitted: the options, the
source's config.json and --keep, the evaluation task names, the token's push access to the target repo and its
right to run Jobs, and the flavor (hub_jobs.py lists the hardware, jobs_flavor.py sizes the job). The job it
describes runs

    sh -c 'python -m pip install "$0" && exec hc-smoe-push "$@"' <requirement> <the same arguments>

where <requirement> is this very version of hc-smoe-hub (`hc-smoe-hub[eval]==<version>`, or the git commit it was
installed from), the arguments are the user's minus the ones that only concern the submission (--on-jobs,
--flavor, --timeout, --yes, --token, --output-dir) plus the resolved --repo-id, and the token is the job's
secret `HF_TOKEN`, never in its command or environment in clear. The job cannot write to the user's disk, so it
must push: --no-push is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from hc_smoe_hub import __version__, hub, hub_jobs, jobs_flavor
from hc_smoe_hub.errors import HcSmoeError
from hc_smoe_hub.hub_jobs import Flavor, JobSpecification, JobState

log = logging.getLogger(__name__)

PACKAGE = "hc-smoe-hub"
# Python with pip on Debian; pip then installs the CUDA build of torch that PyPI serves for Linux x86_64.
JOB_IMAGE = "python:3.12"
JOB_LABELS = {"app": "hc-smoe-hub"}
INSTALL_AND_RUN = 'python -m pip install --quiet --no-cache-dir "$0" && exec hc-smoe-push "$@"'
# Options that only concern the submission: (takes a value, ...) and switches.
SUBMIT_OPTIONS = ("--flavor", "--timeout", "--token", "--output-dir", "--repo-id")
SUBMIT_SWITCHES = ("--on-jobs", "--yes")
_LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".json.gz")


@dataclass
class JobsPlan:
    spec: JobSpecification
    flavor: Flavor
    need: jobs_flavor.Need
    estimate_s: int
    repo_id: str
    namespace: str
    token: str

    @property
    def usd_per_hour(self) -> float:
        return self.flavor.usd_per_hour


def install_requirement(direct_url: dict[str, Any] | None = None) -> str:
    """What the job installs: the git commit this copy was installed from, else the released version.

    `direct_url` is the installed distribution's `direct_url.json` (PEP 610), read when not given: a `pip install
    git+https://...` records the commit there; a release or an editable checkout records none.
    """
    if direct_url is None:
        try:
            direct_url = json.loads(metadata.distribution(PACKAGE).read_text("direct_url.json") or "null")
        except (metadata.PackageNotFoundError, ValueError):
            direct_url = None
    vcs = (direct_url or {}).get("vcs_info") or {}
    url = str((direct_url or {}).get("url") or "")
    if vcs.get("vcs") == "git" and vcs.get("commit_id") and not url.startswith("file:"):
        return f"{PACKAGE}[eval] @ git+{url}@{vcs['commit_id']}"
    return f"{PACKAGE}[eval]=={__version__}"


def job_arguments(argv: list[str], repo_id: str, parser: argparse.ArgumentParser) -> list[str]:
    """The user's arguments for the job: submission-only options removed (abbreviations too), --repo-id resolved."""
    longs = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    out, skip = [], False
    for word in argv:
        if skip:
            skip = False
            continue
        name, has_value = word.split("=", 1)[0], "=" in word
        full = _canonical(name, longs) if word.startswith("--") else name
        if full in SUBMIT_SWITCHES or (full == "-y"):
            continue
        if full in SUBMIT_OPTIONS:
            skip = not has_value
            continue
        out.append(word)
    return [*out, "--repo-id", repo_id]


def _canonical(name: str, longs: list[str]) -> str:
    if name in longs:
        return name
    matches = [o for o in longs if o.startswith(name)]
    return matches[0] if len(matches) == 1 else name


def plan_on_jobs(args: argparse.Namespace, argv: list[str], parser: argparse.ArgumentParser) -> JobsPlan:
    """Every check that needs no download, then the job to submit; HcSmoeError (one line) on the first failure."""
    source, config, tasks, include_path = _checked_source(args)
    token, namespace = hub_jobs.check_jobs_access(args.token)

    from hc_smoe_hub.architectures import spec_for
    from hc_smoe_hub.merge import resolve_keep
    from hc_smoe_hub.pipeline import default_repo_name

    keep_text = args.keep or ("0.75" if args.demo else None)
    keep = resolve_keep(keep_text, spec_for(config), config)
    repo_id = hub.check_push_access(args.repo_id, token=token, default_name=default_repo_name(
        source, args.method, keep_text), overwrite=args.overwrite, private=args.private)

    seq_len = args.seq_len or (256 if args.demo else 2048)
    tokens = args.num_samples * seq_len
    need = jobs_flavor.need_for(config, keep, evaluate=bool(tasks), tokens=tokens)
    flavor = jobs_flavor.choose_flavor(hub_jobs.list_flavors(token), need, args.flavor)
    estimate = jobs_flavor.estimate_seconds(config, keep, flavor, tokens=tokens, tasks=len(tasks),
                                            limit=args.limit)
    if tasks:  # last: indexing lm-eval's own tasks takes seconds
        from hc_smoe_hub.evaluation import EvalSettings, check_tasks

        batch = int(args.eval_batch_size) if str(args.eval_batch_size).isdigit() else args.eval_batch_size
        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        check_tasks(EvalSettings(tasks=tasks, num_fewshot=args.num_fewshot, batch_size=batch, limit=limit,
                                 include_path=include_path))
    timeout = jobs_flavor.parse_timeout(args.timeout) if args.timeout else jobs_flavor.default_timeout(estimate)
    env = {"PYTHONUNBUFFERED": "1"}
    if hub.hub_endpoint() != "https://huggingface.co":
        env["HF_ENDPOINT"] = hub.hub_endpoint()  # a private Hub deployment: the job talks to the same one
    spec = JobSpecification(
        image=JOB_IMAGE,
        command=["sh", "-c", INSTALL_AND_RUN, install_requirement(), *job_arguments(argv, repo_id, parser)],
        flavor=flavor.name, timeout_s=timeout, env=env, secrets={"HF_TOKEN": token},
        labels={**JOB_LABELS, "repo": repo_id.replace("/", "--")},
    )
    return JobsPlan(spec, flavor, need, estimate, repo_id, namespace, token)


def _checked_source(args: argparse.Namespace) -> tuple[str, dict[str, Any], list[str], str | None]:
    """(source, its config.json, evaluation tasks, task folder), refusing what a remote machine cannot do."""
    if args.push_only or args.eval_only:
        raise HcSmoeError("--push-only and --eval-only work on a local directory: run them without --on-jobs")
    if args.no_push:
        raise HcSmoeError("--on-jobs runs on a Hugging Face machine, which cannot write to this disk: the job must "
                          "push, so drop --no-push (or run without --on-jobs)")
    if args.resume:
        raise HcSmoeError("--resume continues a merge on this disk; a job starts on a fresh machine: drop --resume")
    if args.include_path:
        raise HcSmoeError(f"--include-path {args.include_path} is a local folder the job cannot read: use lm-eval's "
                          "own tasks with --on-jobs, or run without --on-jobs")
    calibration = str(args.calibration)
    if Path(calibration).expanduser().exists() or calibration.endswith(_LOCAL_SUFFIXES):
        raise HcSmoeError(f"--calibration {calibration} is a local file the job cannot read: use c4 or a Hub "
                          "dataset id with --on-jobs")
    if args.demo:
        from hc_smoe_hub import demo
        from hc_smoe_hub.merge import read_config

        if not args.repo_id:
            raise HcSmoeError("--demo pushes only with --repo-id, and a job must push: add --repo-id NAME")
        tasks = [] if args.skip_eval else args.tasks.split(",") if args.tasks else list(demo.DEMO_TASKS)
        folder = None if args.tasks or args.skip_eval else str(demo.task_dir())
        return f"demo-{args.demo_model}", read_config(demo.DEMO_MODELS[args.demo_model]), tasks, folder
    from hc_smoe_hub.merge import is_hub_id

    if not args.source:
        raise HcSmoeError("give a SOURCE model (a Hub repo id), or --demo")
    if not is_hub_id(args.source):
        raise HcSmoeError(f"{args.source} is not a Hub repo id: a job reads its source from the Hub, so push the "
                          "model there first (or run without --on-jobs)")
    if args.keep is None:
        raise HcSmoeError("--keep is required: the number (or fraction) of experts to keep per layer")
    from hc_smoe_hub.checkpoint import parse_size

    try:
        parse_size(args.max_shard_size)
    except ValueError as exc:
        raise HcSmoeError(f"--max-shard-size: {exc}") from None
    from hc_smoe_hub.evaluation import PAPER_TASKS

    tasks = [] if args.skip_eval else [t.strip() for t in (args.tasks.split(",") if args.tasks else PAPER_TASKS)
                                       if t.strip()]
    config = hub.fetch_config(args.source, revision=args.revision, token=args.token)
    return args.source, config, tasks, None


def submit(plan: JobsPlan) -> JobState:
    log.info("submitting to Hugging Face Jobs on %s: %s", plan.flavor.name, plan.spec.command[:3])
    return hub_jobs.submit(plan.spec, plan.token, plan.namespace)


def repo_url(repo_id: str) -> str:
    return f"{hub.hub_endpoint()}/{repo_id}"
