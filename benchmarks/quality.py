"""Quality of every expert-reduction configuration on the three shipped demo MoE models.

For each demo model at 75% and 50% of its experts: held-out loss (mean next-token cross-entropy on the demo's
held-out documents, never seen in training or calibration), and the demo multiple-choice task's accuracy through
lm-eval, for the original model and every configuration below. The defaults of the tool are set from this table.

Run: python benchmarks/quality.py [--record] [--only 'NAME|NAME'] [--models mixtral,qwen-moe,qwen15-moe] [--keeps 45,30]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import torch
from engine import record
from transformers import AutoModelForCausalLM, AutoTokenizer

from hc_smoe_hub import demo
from hc_smoe_hub.calibration import CalibrationSpec
from hc_smoe_hub.evaluation import EvalSettings, evaluate
from hc_smoe_hub.merge import MergeRequest, merge_checkpoint
from hc_smoe_hub.methods import METHODS, MethodOptions

SEQ_LEN = 256
HELDOUT_BLOCKS = 200
HEADER = (f"Command: `python benchmarks/quality.py --record` ({platform.machine()} CPU, torch {torch.__version__}; "
          f"calibration: the shipped demo text, 32 x {SEQ_LEN} tokens, seed 42; held-out loss: mean next-token "
          f"cross-entropy on {HELDOUT_BLOCKS} blocks of {SEQ_LEN} tokens of the held-out documents; acc: the "
          "demo_mc task through lm-eval, 400 items, chance 0.25). Lower loss is better; the best loss per column "
          "is bold.")

# name -> (MethodOptions fields, sequential)
CONFIGS: dict[str, tuple[dict, bool]] = {
    "HC-SMoE paper (avg, freq merge, one-shot, router mean)": ({"merge": "freq", "router": "mean"}, False),
    "HC-SMoE paper + router fit": ({"merge": "freq", "router": "fit"}, False),
    "HC-SMoE paper + router dominant": ({"merge": "freq", "router": "dominant"}, False),
    "HC-SMoE single linkage": ({"merge": "freq", "router": "mean", "linkage": "single"}, False),
    "HC-SMoE sequential": ({"merge": "freq", "router": "mean"}, True),
    "HC-SMoE fix-dom merge": ({"merge": "fix-dom", "router": "mean"}, False),
    "HC clusters, keep dominant member": ({"merge": "dominant", "router": "dominant"}, False),
    "HC clusters, dominant + lsq down refit": ({"merge": "dominant-lsq", "router": "dominant"}, False),
    "HC clusters, dominant + lsq, sequential": ({"merge": "dominant-lsq", "router": "dominant"}, True),
    "HC clusters, freq + lsq, router fit, sequential": ({"merge": "freq-lsq", "router": "fit"}, True),
    "HC clusters, freq + lsq, router fit": ({"merge": "freq-lsq", "router": "fit"}, False),
    "HC clusters, fix-dom + lsq, router fit, sequential": ({"merge": "fix-dom-lsq", "router": "fit"}, True),
    "HC clusters, dominant + lsq, router fit, sequential": ({"merge": "dominant-lsq", "router": "fit"}, True),
    "HC single linkage, freq + lsq, router fit, sequential": ({"merge": "freq-lsq", "router": "fit",
                                                               "linkage": "single"}, True),
    "anchored, freq + lsq, router fit, sequential": ({"method": "anchored", "merge": "freq-lsq", "router": "fit"},
                                                     True),
    "anchored, fix-dom + lsq, router fit, sequential": ({"method": "anchored", "merge": "fix-dom-lsq",
                                                         "router": "fit"}, True),
    "anchored, dominant + lsq, router fit, sequential": ({"method": "anchored", "merge": "dominant-lsq",
                                                          "router": "fit"}, True),
    "anchored-o, freq + lsq, router fit, sequential": ({"method": "anchored-o", "merge": "freq-lsq",
                                                        "router": "fit"}, True),
    "anchored-o, fix-dom + lsq, router fit, sequential": ({"method": "anchored-o", "merge": "fix-dom-lsq",
                                                           "router": "fit"}, True),
    "takeover, fix-dom + lsq, router fit, sequential": ({"method": "takeover", "merge": "fix-dom-lsq",
                                                         "router": "fit"}, True),
    "best-grouping, fix-dom + lsq, router fit, sequential": ({"method": "best-grouping", "merge": "fix-dom-lsq",
                                                              "router": "fit"}, True),
    "HC clusters, fix-dom + rr, router fit, sequential": ({"merge": "fix-dom-rr", "router": "fit"}, True),
    "anchored, fix-dom + rr, router fit, sequential": ({"method": "anchored", "merge": "fix-dom-rr",
                                                        "router": "fit"}, True),
    "anchored-o, fix-dom + rr, router fit, sequential": ({"method": "anchored-o", "merge": "fix-dom-rr",
                                                          "router": "fit"}, True),
    "takeover, fix-dom + rr, router fit, sequential": ({"method": "takeover", "merge": "fix-dom-rr",
                                                        "router": "fit"}, True),
    "takeover, dominant + rr, router fit, sequential": ({"method": "takeover", "merge": "dominant-rr",
                                                         "router": "fit"}, True),
    "takeover, freq + rr, router fit, sequential": ({"method": "takeover", "merge": "freq-rr",
                                                     "router": "fit"}, True),
    "random clusters (freq merge)": ({"method": "random", "merge": "freq", "router": "mean"}, False),
    "F-prune": ({"method": "f-prune"}, False),
    "S-prune": ({"method": "s-prune"}, False),
    "O-prune": ({"method": "o-prune"}, False),
    "REAP": ({"method": "reap"}, False),
    "M-SMoE": ({"method": "m-smoe", "router": "mean"}, False),
    "Diversify": ({"method": "diversify", "router": "mean"}, False),
}


def heldout_loss(model, tokenizer) -> float:
    texts = [json.loads(line)["text"] for line in demo.HELDOUT_TEXT.read_text().splitlines() if line.strip()]
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        if len(ids) >= HELDOUT_BLOCKS * SEQ_LEN:
            break
    n = min(len(ids) // SEQ_LEN, HELDOUT_BLOCKS)
    blocks = torch.tensor(ids[: n * SEQ_LEN]).view(n, SEQ_LEN)
    total = 0.0
    with torch.no_grad():
        for s in range(0, n, 16):
            out = model(blocks[s : s + 16], labels=blocks[s : s + 16])
            total += float(out.loss) * blocks[s : s + 16].shape[0]
    return total / n


def score(directory: Path) -> dict[str, float]:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    loss = heldout_loss(model, tokenizer)
    res = evaluate(model, tokenizer, EvalSettings(tasks=["demo_mc"], include_path=str(demo.task_dir()),
                                                  batch_size=32))
    return {"loss": loss, "acc": res["demo_mc"]["acc"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--only", default=None, help="|-separated config names (substring match)")
    ap.add_argument("--models", default="mixtral,qwen-moe,qwen15-moe")
    ap.add_argument("--json", default="benchmarks/quality_results.json")
    ap.add_argument("--keeps", default=None, help="comma-separated expert counts (default: 75%% and 50%% of N)")
    ap.add_argument("--render-only", action="store_true", help="re-render the table from --json, run nothing")
    args = ap.parse_args()
    if args.render_only:
        report = render(json.loads(Path(args.json).read_text()))
        print(report)
        if args.record:
            record("quality", f"{HEADER}\n\n{report}\n")
        return
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # evaluation on 2 threads next to other work is several times slower here
    configs = {k: v for k, v in CONFIGS.items()
               if not args.only or any(o.strip().lower() in k.lower() for o in args.only.split("|"))}
    out_json = Path(args.json)
    table: dict = json.loads(out_json.read_text()) if out_json.exists() else {}
    tmp = Path(tempfile.mkdtemp(prefix="hcsmoe-quality-"))
    for model_name in args.models.split(","):
        src = demo.DEMO_MODELS[model_name]
        n = json.loads((src / "config.json").read_text()).get("num_local_experts") or json.loads(
            (src / "config.json").read_text())["num_experts"]
        table.setdefault(model_name, {})["original"] = score(src)
        print(model_name, "original", table[model_name]["original"], flush=True)
        keeps = [int(k) for k in args.keeps.split(",")] if args.keeps else [n * 3 // 4, n // 2]
        for keep in keeps:
            for name, (fields, sequential) in configs.items():
                method = fields.get("method", "hc-smoe")
                if method not in METHODS:
                    print(f"skip {name}: method {method} not available", flush=True)
                    continue
                out = tmp / f"{model_name}-{keep}-{abs(hash(name))}"
                t = time.perf_counter()
                merge_checkpoint(MergeRequest(
                    source=str(src), keep=str(keep), output_dir=out,
                    calibration=CalibrationSpec(str(demo.CALIBRATION_TEXT), 32, SEQ_LEN, 42),
                    options=MethodOptions(**{"method": method, **fields}), sequential=sequential, device="cpu"))
                result = {**score(out), "merge_s": time.perf_counter() - t}
                table[model_name].setdefault(str(keep), {})[name] = result
                print(model_name, keep, name, result, flush=True)
                out_json.write_text(json.dumps(table, indent=1))
    report = render(table)
    print(report)
    if args.record:
        record("quality", f"{HEADER}\n\n{report}\n")


def render(table: dict) -> str:
    lines = []
    for model_name, rows in table.items():
        orig = rows["original"]
        keeps = [k for k in rows if k != "original"]
        lines += [f"**{model_name}-demo** (original: held-out loss {orig['loss']:.3f}, demo_mc acc {orig['acc']:.3f})",
                  "", "| configuration | " + " | ".join(f"loss @{k} | acc @{k}" for k in keeps) + " |",
                  "|---|" + "---|---|" * len(keeps)]
        order = {name: i for i, name in enumerate(CONFIGS)}  # the table's order, whatever order rows ran in
        names = sorted(dict.fromkeys(n for k in keeps for n in rows[k]), key=lambda n: order.get(n, len(order)))
        for name in names:
            cells = []
            for k in keeps:
                r = rows[k].get(name)
                best = min(v["loss"] for v in rows[k].values())
                loss = f"**{r['loss']:.3f}**" if r and r["loss"] == best else (f"{r['loss']:.3f}" if r else "-")
                cells += [loss, f"{r['acc']:.3f}" if r else "-"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
