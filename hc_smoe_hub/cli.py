"""The `hc-smoe-push` command: parse the arguments, call the pipeline, print the outcome. Nothing else.

Run `hc-smoe-push --help`. User errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from hc_smoe_hub import __version__
from hc_smoe_hub.calibration import DEFAULT_CALIBRATION, CalibrationSpec
from hc_smoe_hub.clustering import LINKAGES, METRICS
from hc_smoe_hub.errors import HcSmoeError
from hc_smoe_hub.merge import MergeRequest, merge_checkpoint
from hc_smoe_hub.merging import MERGE_MODES, ROUTER_MODES
from hc_smoe_hub.methods import METHODS, MethodOptions


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
    p.add_argument("--revision", help="source revision (branch, tag or commit) on the Hub")
    p.add_argument("--token", help="Hugging Face token (default: HF_TOKEN or the stored login)")
    p.add_argument("--version", action="version", version=f"hc-smoe-hub {__version__}")

    c = p.add_argument_group("calibration")
    c.add_argument("--calibration", default=DEFAULT_CALIBRATION,
                   help="'c4' (the paper's C4 shard), a Hub dataset id, or a local .txt/.jsonl/.json.gz file")
    c.add_argument("--num-samples", type=int, default=32, help="calibration blocks (default 32)")
    c.add_argument("--seq-len", type=int, default=2048, help="tokens per block (default 2048)")
    c.add_argument("--seed", type=int, default=42, help="shuffle seed (default 42)")

    m = p.add_argument_group("method")
    m.add_argument("--method", default="hc-smoe", choices=sorted(METHODS), help="expert reduction method")
    m.add_argument("--linkage", default="average", choices=LINKAGES)
    m.add_argument("--metric", default="euclidean", choices=METRICS)
    m.add_argument("--merge", default="freq", choices=MERGE_MODES, help="how a cluster becomes one expert")
    m.add_argument("--router", default="fit", choices=ROUTER_MODES, help="how the K router rows are made")
    m.add_argument("--paper-frequency", action="store_true",
                   help="count usage over top-2 as the official HC-SMoE code does (reproduction only)")
    seq = m.add_mutually_exclusive_group()
    seq.add_argument("--sequential", dest="sequential", action="store_true", default=True,
                     help="layer l+1 is calibrated on the outputs of the merged layers before it (default)")
    seq.add_argument("--one-shot", dest="sequential", action="store_false",
                     help="every layer is calibrated on the original model's hidden states")

    r = p.add_argument_group("runtime")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    r.add_argument("--dtype", default="auto", help="compute dtype: auto, float32, bfloat16, float16")
    r.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    r.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return _run(args)
    except HcSmoeError as exc:
        print(f"hc-smoe-push: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hc-smoe-push: interrupted; no output was left behind", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    if not args.source:
        raise HcSmoeError("give a SOURCE model (a local directory or a Hub repo id)")
    if args.keep is None:
        raise HcSmoeError("--keep is required: the number (or fraction) of experts to keep per layer")
    if not args.no_push:
        raise HcSmoeError("pushing is not available in this version: pass --no-push with --output-dir")
    output = args.output_dir or f"{args.source.rstrip('/').split('/')[-1]}-{args.keep}e"
    request = MergeRequest(
        source=args.source,
        keep=args.keep,
        output_dir=Path(output),
        calibration=CalibrationSpec(args.calibration, args.num_samples, args.seq_len, args.seed),
        options=MethodOptions(args.method, args.linkage, args.metric, args.merge, args.router,
                              args.paper_frequency, args.seed),
        sequential=args.sequential,
        device=args.device,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        revision=args.revision,
        token=args.token,
    )
    result = merge_checkpoint(request)
    print(f"merged {result.experts_before} -> {result.experts_after} experts per layer: {result.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
