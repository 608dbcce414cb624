"""Memory and time of a merge at the exact layer shapes of Mixtral-8x7B, Qwen1.5-MoE-A2.7B and Qwen3-30B-A3B.

For each shape a random bf16 checkpoint of two decoder layers is written shard by shard (never whole in memory,
`synthetic.write_random_checkpoint`), then merged in a fresh process with the default method and with `--paper`,
calibrated on 8 x 512 tokens: per-layer seconds and the process's peak RSS (VmHWM), against the goal of
2.5 x one layer's weight bytes + 1 GiB and against `sizing.merge_peak_bytes`, the figure the README's formula gives.

Each layer's own peak is sampled too, so that `--layers 6` shows whether memory grows with depth at these shapes.

Run: python benchmarks/real_shapes.py [--record] [--shapes mixtral,qwen15,qwen3] [--device cuda] [--layers 6]
     python benchmarks/real_shapes.py --scale 16   (every width divided by 16: a quick check of the script itself)
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from hc_smoe_hub import sizing
from hc_smoe_hub.synthetic import calibration_text, write_random_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from engine import PAPER, PEAK, record  # noqa: E402

GIB = 1 << 30
ATTN = {"max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "num_hidden_layers": 2}
# The published configs' layer fields (config.json of each Hub repo); the vocabulary is the shipped tokenizer's.
SHAPES = {
    "mixtral": ("Mixtral-8x7B", 6, {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
                                    "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
                                    "num_experts_per_tok": 2, "rope_theta": 1e6}),
    "qwen15": ("Qwen1.5-MoE-A2.7B", 45, {"model_type": "qwen2_moe", "hidden_size": 2048, "intermediate_size": 5632,
                                         "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
                                         "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 60,
                                         "num_experts_per_tok": 4, "norm_topk_prob": False,
                                         "decoder_sparse_step": 1, "qkv_bias": True}),
    "qwen3": ("Qwen3-30B-A3B", 64, {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
                                    "moe_intermediate_size": 768, "num_attention_heads": 32,
                                    "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
                                    "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1}),
}
WIDTHS = ("hidden_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size")
CALIB = {"num_samples": 8, "seq_len": 512}  # the setting; --num-samples 32 --seq-len 2048 is the default run's

CHILD = """
import json, logging, re, threading, time, torch
from pathlib import Path
from hc_smoe_hub.calibration import CalibrationSpec
from hc_smoe_hub.merge import MergeRequest, merge_checkpoint
from hc_smoe_hub.methods import MethodOptions
torch.set_num_threads({threads})
# Each decoder layer's peak RSS, sampled every 20 ms: the engine logs "layer i: ..." as it finishes layer i.
running, peaks, done = [0], {{}}, threading.Event()
class Finished(logging.Handler):
    def emit(self, record):
        found = re.match(r"layer (\\d+):", record.getMessage())
        if found:
            running[0] = int(found.group(1)) + 1
logging.getLogger("hc_smoe_hub.streaming").addHandler(Finished())
logging.getLogger("hc_smoe_hub.streaming").setLevel(logging.INFO)
def sample():
    while not done.wait(0.02):
        rss = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
        peaks[running[0]] = max(peaks.get(running[0], 0), rss)
threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
r = merge_checkpoint(MergeRequest(source={src!r}, keep={keep!r}, output_dir=Path({out!r}),
    calibration=CalibrationSpec({calib!r}, {n}, {s}), device={device!r}, options=MethodOptions(**{options}),
    sequential={sequential}))
done.set()
gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
print(json.dumps({{"rss": {peak}, "gpu": gpu, "wall": time.perf_counter() - t, "merge": r.timings["merge"],
                  "layers": [l.seconds for l in r.layers], "errors": [l.output_rel_error for l in r.layers],
                  "layer_rss": [peaks.get(i, 0) for i in range(len(r.layers))]}}))
"""


def fields_for(name: str, scale: int) -> dict:
    fields = {**SHAPES[name][2], **ATTN}
    for key in WIDTHS:
        if key in fields:
            fields[key] = max(16, fields[key] // scale)
    if scale > 1 and "head_dim" in fields:
        fields["head_dim"] = max(8, fields["head_dim"] // scale)
    return fields


def merge_child(src: Path, out: Path, calib: Path, keep: int, options: dict, sequential: bool, device: str,
                threads: int) -> dict:
    code = CHILD.format(threads=threads, src=str(src), keep=str(keep), out=str(out), calib=str(calib),
                        n=CALIB["num_samples"], s=CALIB["seq_len"], device=device, options=options,
                        sequential=sequential, peak=PEAK)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"merge of {src.name} failed:\n{run.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--record", action="store_true", help="append this run to its section of benchmarks/RESULTS.md")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--scale", type=int, default=1, help="divide every width by this (1: the real shapes)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default="default,--paper")
    ap.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary directory)")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers per checkpoint (more: growth with depth)")
    ap.add_argument("--num-samples", type=int, default=CALIB["num_samples"])
    ap.add_argument("--seq-len", type=int, default=CALIB["seq_len"])
    args = ap.parse_args()
    CALIB.update(num_samples=args.num_samples, seq_len=args.seq_len)
    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="hcsmoe-shapes-"))
    tmp.mkdir(parents=True, exist_ok=True)
    tokens = CALIB["num_samples"] * CALIB["seq_len"]
    calib = calibration_text(tmp / "calib.txt", paragraphs=2000 * max(1, tokens // 16384))
    lines = [f"Machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}, device "
             f"{args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
             + f"; calibration {CALIB['num_samples']} x {CALIB['seq_len']} tokens; {args.layers} decoder layers per "
             f"checkpoint, random bf16 weights" + (f"; every width / {args.scale}" if args.scale > 1 else "") + ".",
             "", "| shape | experts | layer weights GiB | method | s per layer | peak RSS GiB | goal GiB "
             "| formula GiB | GPU peak GiB | peak RSS per layer GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    failures = []
    for name in args.shapes.split(","):
        label, keep, _ = SHAPES[name]
        fields = {**fields_for(name, args.scale), "num_hidden_layers": args.layers}
        src = write_random_checkpoint(tmp / name, fields)
        config = json.loads((src / "config.json").read_text())
        layer = sizing.layer_weight_bytes(config)
        goal = 2.5 * layer + GIB
        formula = sizing.merge_peak_bytes(config, tokens=tokens, keep=keep)
        n = sizing.num_routed_experts(config)
        for method, options, sequential in (("default", {}, True), ("--paper", PAPER, False)):
            if method not in args.methods.split(","):
                continue
            r = merge_child(src, tmp / f"{name}-out", calib, keep, options, sequential, args.device, args.threads)
            per_layer = " + ".join(f"{s:.0f}" for s in r["layers"])
            ok = r["rss"] <= goal
            failures += [] if ok else [f"{label} {method}: {r['rss'] / GIB:.2f} GiB > goal {goal / GIB:.2f}"]
            row = (f"| {label} | {n} -> {keep} | {layer / GIB:.2f} | {method} | {per_layer} | "
                   f"{'**' if ok else ''}{r['rss'] / GIB:.2f}{'**' if ok else ''} | {goal / GIB:.2f} | "
                   f"{formula / GIB:.2f} | {r['gpu'] / GIB:.2f} | "
                   + " ".join(f"{b / GIB:.2f}" for b in r["layer_rss"]) + " |")
            print(row, flush=True)
            lines.append(row)
        shutil.rmtree(src, ignore_errors=True)
    lines += ["", "Goal: peak RSS <= 2.5 x one decoder layer's weight bytes + 1 GiB (bold where met). "
              "Formula: `sizing.merge_peak_bytes` at these calibration tokens, what the README tells a user to "
              "provision."]
    if failures:
        lines += ["", "Over the goal: " + "; ".join(failures)]
    report = "\n".join(lines)
    print(report)
    if args.record:
        section = "real-shapes" if args.device == "cpu" else "real-shapes-gpu"
        if CALIB != {"num_samples": 8, "seq_len": 512}:
            section += f"-{CALIB['num_samples']}x{CALIB['seq_len']}"
        command = " ".join(["python benchmarks/real_shapes.py", *sys.argv[1:]])
        record(section, f"Run of {datetime.date.today()}, command: `{command}`\n\n{report}\n", append=True)


if __name__ == "__main__":
    main()
