"""The `hc-smoe-push` command: parse the arguments, call the pipeline, print the outcome. Nothing else.

Run `hc-smoe-push --help`. User errors print one line on stderr and exit with status 2; a failure after the merge
says how to finish the job (`--eval-only`, `--push-only`), one during it how to resume (`--resume`). An unexpected
exception is one line naming the stage and the log; its traceback is in `run.log` (runlog.py).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from hc_smoe_hub import __version__, jobs_cli
from hc_smoe_hub.calibration import DEFAULT_CALIBRATION, CalibrationSpec
from hc_smoe_hub.clustering import LINKAGES, METRICS
from hc_smoe_hub.errors import HcSmoeError
from hc_smoe_hub.merge import MergeRequest
from hc_smoe_hub.merging import MERGE_MODES, ROUTER_MODES
from hc_smoe_hub.methods import METHODS, MethodOptions
from hc_smoe_hub.run_state import RunState, failure_line, without_token
from hc_smoe_hub.runlog import RUN_LOG, pending_log_path

_traceback_log = logging.getLogger("hc_smoe_push.failure")  # outside the tool's logger: run.log only

DEFAULTS = MethodOptions()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hc-smoe-push",
        description="Merge the experts of a Mixture-of-Experts model (HC-SMoE, arXiv 2410.08589) into a smaller "
        "checkpoint that stock transformers loads.",
    )
    p.add_argument("source", nargs="?", help="local model directory or Hub repo id (org/name)")
    p.add_argument("--keep", help="experts to keep per MoE layer: a count 1..N or a fraction in (0, 1)")
    p.add_argument("--output-dir", help="where the merged checkpoint is written (default: ./<name>-<K>e)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-push", action="store_true", help="only write --output-dir, do not push")
    p.add_argument("--repo-id", help="target Hub repo (default: <your user>/<source>-<method>-<K>e)")
    p.add_argument("--private", action="store_true", help="create the target repo as private")
    p.add_argument("--push-only", metavar="DIR", help="push a finished output directory (e.g. after a failed upload)")
    p.add_argument("--eval-only", metavar="DIR",
                   help="evaluate a finished output directory and write its card (then push it, with --repo-id)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted merge of the same command: finished layers are not merged again")
    p.add_argument("--demo", action="store_true",
                   help="run offline on a small trained MoE shipped with the package (no push unless --repo-id)")
    p.add_argument("--demo-model", default="mixtral", choices=["mixtral", "qwen-moe", "qwen15-moe"],
                   help="which shipped demo model --demo uses (default mixtral)")
    p.add_argument("--revision", help="source revision (branch, tag or commit) on the Hub")
    p.add_argument("--token", help="Hugging Face token (default: HF_TOKEN or the stored login)")
    p.add_argument("--version", action="version", version=f"hc-smoe-hub {__version__}")

    c = p.add_argument_group("calibration")
    c.add_argument("--calibration", default=DEFAULT_CALIBRATION,
                   help="'c4' (the paper's C4 shard), a Hub dataset id, or a local .txt/.jsonl/.json.gz file")
    c.add_argument("--num-samples", type=int, default=32, help="calibration blocks (default 32)")
    c.add_argument("--seq-len", type=int, default=None, help="tokens per block (default 2048; 256 with --demo)")
    c.add_argument("--seed", type=int, default=42, help="shuffle seed (default 42)")

    m = p.add_argument_group("method")
    m.add_argument("--method", default=DEFAULTS.method, choices=sorted(METHODS),
                   help=f"expert reduction method (default {DEFAULTS.method}; the paper's is hc-smoe)")
    m.add_argument("--linkage", default="average", choices=LINKAGES)
    m.add_argument("--metric", default="euclidean", choices=METRICS)
    m.add_argument("--merge", default=DEFAULTS.merge, choices=MERGE_MODES,
                   help=f"how a cluster becomes one expert (default {DEFAULTS.merge}, see benchmarks/RESULTS.md)")
    m.add_argument("--router", default=DEFAULTS.router, choices=ROUTER_MODES,
                   help=f"how the K router rows are made (default {DEFAULTS.router})")
    m.add_argument("--paper", action="store_true",
                   help="HC-SMoE exactly as the paper runs it: average linkage, euclidean, freq merge, one-shot "
                   "calibration (router fit: the paper's N-row routing in K rows)")
    m.add_argument("--paper-frequency", action="store_true",
                   help="count usage over top-2 as the official HC-SMoE code does (reproduction only)")
    seq = m.add_mutually_exclusive_group()
    seq.add_argument("--sequential", dest="sequential", action="store_true", default=True,
                     help="layer l+1 is calibrated on the outputs of the merged layers before it (default)")
    seq.add_argument("--one-shot", dest="sequential", action="store_false",
                     help="every layer is calibrated on the original model's hidden states")

    e = p.add_argument_group("evaluation (EleutherAI lm-eval, on the original and the merged model)")
    e.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval tasks (default: the paper's eight, 0-shot; demo tasks with --demo)")
    e.add_argument("--include-path", help="directory of extra lm-eval task YAMLs")
    e.add_argument("--num-fewshot", type=int, default=0)
    e.add_argument("--eval-batch-size", default="8", help="lm-eval batch size (a number or 'auto')")
    e.add_argument("--limit", type=float, default=None, help="examples per task (a count, or a fraction < 1)")
    e.add_argument("--skip-eval", action="store_true", help="do not evaluate")
    e.add_argument("--max-memory", default=None,
                   help="accelerate's per-device memory budget for evaluation, e.g. '0=70GiB,cpu=200GiB' (the "
                   "rest is offloaded to disk)")

    r = p.add_argument_group("runtime")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    r.add_argument("--dtype", default="auto", help="compute dtype: auto, float32, bfloat16, float16; for a "
                   "quantized (FP8, MXFP4) source the OUTPUT's dtype: auto keeps the source's "
                   "format, bfloat16 writes it dequantized")
    r.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    r.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    r.add_argument("-v", "--verbose", action="store_true",
                   help="show every library's log on the terminal too (it always goes to run.log)")
    jobs_cli.add_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    state = RunState(args, argv)
    try:
        return _run(args, argv, state)
    except BaseException as exc:  # noqa: BLE001  (every failure becomes one line; the traceback goes to run.log)
        if isinstance(exc, SystemExit):
            raise
        code, line = failure_line(exc, state)
        if state.log is not None:
            # A refusal is its own explanation; anything else keeps its traceback in the log.
            plain = isinstance(exc, HcSmoeError) and not isinstance(exc.__cause__, Exception | KeyboardInterrupt)
            _traceback_log.error("%s", line, exc_info=None if plain else exc)
        print(f"hc-smoe-push: error: {line}", file=sys.stderr)
        return code
    finally:
        state.close()


def _run(args: argparse.Namespace, argv: list[str], state: RunState) -> int:
    from hc_smoe_hub.pipeline import eval_only, push_only, run_job

    if args.on_jobs:
        return jobs_cli.run_on_jobs(args, argv, build_parser())
    if args.push_only:
        state.open_log(Path(args.push_only) / RUN_LOG, into_dir=True)
        state.stage = "push"
        url = push_only(Path(args.push_only), args.repo_id, args.token, args.private, args.overwrite)
        print(f"pushed {args.push_only} to {url}")
        return 0
    if args.eval_only:
        directory = Path(args.eval_only)
        if not directory.is_dir():
            raise HcSmoeError(f"--eval-only {directory}: no such directory; give the output directory of a "
                              "finished merge")
        state.open_log(directory / RUN_LOG, into_dir=True)
        state.output_dir = directory
        job = build_job(args, argv, source="", keep="", output=directory, push=args.repo_id is not None)
        result = eval_only(directory, job, on_stage=state.on_stage)
        _print_summary(result, args)
        return 0
    include_path = args.include_path
    if args.demo:
        from hc_smoe_hub import demo

        source = str(demo.DEMO_MODELS[args.demo_model])
        calibration = args.calibration if args.calibration != DEFAULT_CALIBRATION else str(demo.CALIBRATION_TEXT)
        seq_len = args.seq_len or 256
        tasks = args.tasks.split(",") if args.tasks else list(demo.DEMO_TASKS)
        include_path = include_path or (str(demo.task_dir()) if not args.tasks else None)
        push = args.repo_id is not None and not args.no_push
        keep = args.keep or "0.75"
    else:
        if not args.source:
            raise HcSmoeError("give a SOURCE model (a local directory or a Hub repo id), or --demo")
        if args.keep is None:
            raise HcSmoeError("--keep is required: the number (or fraction) of experts to keep per layer")
        source, calibration, seq_len, keep = args.source, args.calibration, args.seq_len or 2048, args.keep
        tasks = args.tasks.split(",") if args.tasks else None
        push = not args.no_push
    name = "demo-" + args.demo_model if args.demo else source.rstrip("/").split("/")[-1]
    if args.paper:
        args.method, args.linkage, args.metric, args.merge = "hc-smoe", "average", "euclidean", "freq"
        args.router, args.sequential = "fit", False
    output = Path(args.output_dir or f"{name}-{args.method}-{keep}")
    state.output_dir, state.push, state.tasks, state.include_path = output, push, tasks, include_path
    state.open_log(pending_log_path(output), into_dir=False)
    job = build_job(args, argv, source=source, keep=keep, output=output, push=push, calibration=calibration,
                    seq_len=seq_len, tasks=tasks, include_path=include_path)
    job.on_checkpoint = state.checkpoint_ready
    result = run_job(job, on_stage=state.on_stage)
    _print_summary(result, args)
    return 0


def build_job(args: argparse.Namespace, argv: list[str], *, source: str, keep: str, output: Path, push: bool,
              calibration: str | None = None, seq_len: int | None = None, tasks: list[str] | None = None,
              include_path: str | None = None):
    """The pipeline's request from the parsed arguments (for a merge, or for --eval-only with no source)."""
    from hc_smoe_hub.pipeline import JobRequest

    include_path = include_path if include_path is not None else args.include_path
    if tasks is None and args.tasks:
        tasks = args.tasks.split(",")
    evaluation = None
    max_memory = None
    if args.max_memory:
        from hc_smoe_hub.evaluation import parse_max_memory

        max_memory = parse_max_memory(args.max_memory)
    if not args.skip_eval:
        from hc_smoe_hub.evaluation import PAPER_TASKS, EvalSettings

        batch = int(args.eval_batch_size) if args.eval_batch_size.isdigit() else args.eval_batch_size
        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        evaluation = EvalSettings(tasks=[t.strip() for t in (tasks or PAPER_TASKS) if t.strip()],
                                  num_fewshot=args.num_fewshot, batch_size=batch, limit=limit,
                                  include_path=include_path)
    request = MergeRequest(
        source=source,
        keep=keep,
        output_dir=output,
        calibration=CalibrationSpec(calibration or args.calibration, args.num_samples, seq_len or 2048, args.seed),
        options=MethodOptions(args.method, args.linkage, args.metric, args.merge, args.router,
                              args.paper_frequency, args.seed),
        sequential=args.sequential,
        device=args.device,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        revision=args.revision,
        token=args.token,
        resume=args.resume,
    )
    return JobRequest(merge=request, push=push, repo_id=args.repo_id, private=args.private, evaluation=evaluation,
                      command=reproduce_command(argv) if source else "", max_memory=max_memory)


def _print_summary(result, args: argparse.Namespace) -> None:
    merged = result.merge
    if merged is not None:
        print(f"merged {merged.experts_before} -> {merged.experts_after} experts per layer "
              f"({merged.family}, method {args.method}): {result.output_dir}")
    else:
        print(f"evaluated {result.output_dir}")
    if result.results_after is not None:
        print(results_table(result.results_before or {}, result.results_after))
    print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items()))
    if result.repo_url:
        print(f"pushed to {result.repo_url}")


# Options that change how a run goes, not what it makes: the card's command leaves them out.
_RUN_ONLY_FLAGS = ("--resume", "--overwrite", "--verbose", "-v", "-q", "--quiet")


def reproduce_command(argv: list[str]) -> str:
    """The command line that reproduces this run, with any token (and run-only switches) removed."""
    return shlex.join(["hc-smoe-push", *(w for w in without_token(argv) if w not in _RUN_ONLY_FLAGS)])


def results_table(before: dict, after: dict) -> str:
    lines = [f"{'task':<24} {'metric':<16} {'original':>10} {'merged':>10} {'change':>10}"]
    for task in sorted(after):
        for metric in ("acc", "acc_norm", "word_perplexity"):
            a, b = before.get(task, {}).get(metric), after[task].get(metric)
            if b is None:
                continue
            old = f"{a:.4f}" if a is not None else "-"
            change = f"{b - a:+.4f}" if a is not None else "-"
            lines.append(f"{task:<24} {metric:<16} {old:>10} {b:>10.4f} {change:>10}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
