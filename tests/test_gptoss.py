"""gpt-oss end to end: tiny checkpoints built with the real transformers class and saved by `save_pretrained`, which
writes the Hub's layout (fused `mlp.experts.gate_up_proj` (E, H, 2I) with gate/up interleaved, `gate_up_proj_bias`,
`down_proj` (E, I, H), `down_proj_bias`, `mlp.router.weight` and `.bias`), plus the same model with its experts in
MXFP4 as openai/gpt-oss-* store them; merged through the CLI and loaded back with stock `from_pretrained`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from router_probe import router_io
from test_families import IDS, _sorted_choice, calibration_ids, run_cli
from test_resume import assert_identical, count_method_calls, crash_after_layer
from test_resume import request as resume_request
from transformers import AutoModelForCausalLM

from hc_smoe_hub.architectures import spec_for
from hc_smoe_hub.checkpoint import SourceCheckpoint
from hc_smoe_hub.cli import main
from hc_smoe_hub.demo import task_dir
from hc_smoe_hub.merge import merge_checkpoint
from hc_smoe_hub.routing import route
from hc_smoe_hub.streaming import StreamingMerger
from hc_smoe_hub.synthetic import (
    MODERN_FAMILY_CONFIGS,
    build_tiny_moe,
    disk_layout,
    tiny_config,
    write_random_checkpoint,
)

N, KEEP = 8, 4
EXPERT_SUFFIXES = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias", "_blocks", "_scales")


@pytest.fixture(scope="module")
def gpt_oss_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpt_oss")
    return {"bf16": build_tiny_moe(root / "bf16", "gpt_oss", dtype=torch.bfloat16),
            "mxfp4": build_tiny_moe(root / "mxfp4", "gpt_oss", mxfp4=True)}


def load(directory: Path):
    """Stock transformers' model, parameters copied out of the mmapped shards (see tests/test_granite.py)."""
    model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    return model.eval(), info


def is_expert_or_router(key: str) -> bool:
    return ".mlp.experts." in key or ".mlp.router." in key


@pytest.mark.parametrize("kind", ["bf16", "mxfp4"])
def test_keeping_every_expert_reproduces_the_source(kind, gpt_oss_models, merge_args, tmp_path):
    src = gpt_oss_models[kind]
    out = tmp_path / "out"
    run_cli(src, out, N, merge_args)
    model, info = load(out)
    assert not any(info.values()), info
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, load(src)[0](IDS).logits)
    a, b = SourceCheckpoint(src), SourceCheckpoint(out)
    assert set(a.tensors) == set(b.tensors)  # MXFP4 stays MXFP4: the same blocks and scales, byte for byte
    assert all(b"".join(a.copy_raw(k)) == b"".join(b.copy_raw(k)) for k in a.tensors)


PLANNED = [("bf16", []), ("bf16", ["--paper"]), ("mxfp4", []), ("mxfp4", ["--dtype", "bfloat16"])]


@pytest.mark.parametrize(("kind", "extra"), PLANNED, ids=["bf16-default", "bf16-paper", "mxfp4-default",
                                                           "mxfp4-to-bf16"])
def test_reduced_checkpoint_stays_fused_loads_and_routes_as_planned(kind, extra, gpt_oss_models, merge_args,
                                                                   calib_file, tmp_path):
    src = gpt_oss_models[kind]
    out = tmp_path / "out"
    prov = run_cli(src, out, KEEP, merge_args, *extra)
    arch = prov["architecture"]
    assert arch["routing"]["scores"] == "topk-softmax" and arch["routing"]["router_bias"] == "router.bias"
    assert arch["activation"] == "clamped-glu"
    model, info = load(out)
    assert not any(info.values()), info
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == KEEP and config["num_experts_per_tok"] == config["experts_per_token"] == 2
    assert ("quantization_config" in config) == (kind == "mxfp4" and not extra)
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()
    a, b = SourceCheckpoint(src), SourceCheckpoint(out)
    expected_keys = set(a.tensors)  # fused stays fused, biases included; MXFP4 stays MXFP4 unless --dtype
    if "--dtype" in extra:
        expected_keys = {k.removesuffix("_blocks") for k in expected_keys if not k.endswith("_scales")}
    assert set(b.tensors) == expected_keys
    for key, info_b in b.tensors.items():
        if key in a.tensors and not is_expert_or_router(key):
            assert b"".join(a.copy_raw(key)) == b"".join(b.copy_raw(key)), key  # attention, sinks, norms, head
        if is_expert_or_router(key):
            assert info_b.shape[0] == KEEP, key
    spec = spec_for(json.loads((src / "config.json").read_text()))
    ids = calibration_ids(src, calib_file)
    for layer in prov["layers"]:
        li, clusters = layer["layer"], layer["clusters"]
        assert len(clusters) == KEEP and sorted(i for c in clusters for i in c) == list(range(N))
        router_key, bias_key = spec.router_key(li), spec.logit_bias_key(li)
        assert bias_key is not None
        got = b.read([router_key, bias_key])
        # The stock router of the reduced model chooses exactly what route() says for the written router and bias.
        x, idx, w = router_io(model, li, "mlp.router", ids)
        routing = spec.routing(config, logit_bias=got[bias_key].float())
        ours_w, ours_i = route(x.float() @ got[router_key].float().T, routing)
        got_i, got_w = _sorted_choice(idx, w)
        exp_i, exp_w = _sorted_choice(ours_i, ours_w)
        assert torch.equal(got_i, exp_i)
        assert torch.allclose(got_w.float(), exp_w, atol=1e-2 if got_w.dtype == torch.bfloat16 else 1e-6)
    if "--paper" in extra:  # a frequency merge of a singleton cluster is the member itself, biases included
        first = prov["layers"][0]
        base = spec.experts_base(first["layer"])
        for k, e in ((k, c[0]) for k, c in enumerate(first["clusters"]) if len(c) == 1):
            for name in ("experts.gate_up_proj", "experts.gate_up_proj_bias", "experts.down_proj_bias"):
                key = base + name
                assert torch.equal(b.read([key], index=k)[key], a.read([key], index=e)[key]), key


def test_the_row_reads_gpt_oss_math_from_the_config(gpt_oss_models):
    config = json.loads((gpt_oss_models["bf16"] / "config.json").read_text())
    spec = spec_for(config)
    act = spec.act({**config, "swiglu_limit": 5.0})
    assert (act.alpha, act.limit) == (config["swiglu_alpha"], 5.0)
    routing = spec.routing(config, logit_bias=torch.zeros(N))
    assert routing.scoring == "topk-softmax" and not routing.plain_softmax
    assert spec.attn_implementation == "eager"  # attention sinks: transformers has no sdpa path for gpt-oss


def test_pruning_an_mxfp4_source_keeps_each_kept_experts_bytes(gpt_oss_models, merge_args, tmp_path):
    """A pruned expert is written unchanged: its MXFP4 blocks and scales (and biases) are the source's row, even
    when it moves to another row (re-quantizing a dequantized MXFP4 row gives back the same bytes)."""
    src = gpt_oss_models["mxfp4"]
    out = tmp_path / "out"
    prov = run_cli(src, out, KEEP, merge_args, "--method", "f-prune")
    a, b = SourceCheckpoint(src), SourceCheckpoint(out)
    moved = 0
    for layer in prov["layers"]:
        kept = [c[0] for c in layer["clusters"]]
        moved += sum(k != e for k, e in enumerate(kept))
        base = f"model.layers.{layer['layer']}.mlp.experts."
        for name in ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales",
                     "gate_up_proj_bias", "down_proj_bias"):
            key = base + name
            for k, e in enumerate(kept):
                assert torch.equal(b.read([key], index=k)[key], a.read([key], index=e)[key]), (key, k, e)
    assert moved  # some kept expert changed rows, so the bytes were not merely copied in place


def test_the_engine_runs_each_layer_as_the_model_does(merge_args, tmp_path, monkeypatch):
    """Sliding-window (8 tokens, shorter than the 64-token calibration blocks) and full-attention layers with
    sinks: every decoder layer's output the engine computes equals the stock model's on the same block (fp32, so
    that the comparison is tight)."""
    src = build_tiny_moe(tmp_path / "fp32", "gpt_oss")
    config = json.loads((src / "config.json").read_text())
    assert config["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert config["sliding_window"] < 64
    blocks: list[torch.Tensor] = []
    after: dict[int, list[torch.Tensor]] = {}
    embed, process = StreamingMerger._embed, StreamingMerger._process_layer

    def record_blocks(self, model, b):
        blocks.append(b)
        return embed(self, model, b)

    def record_layer(self, layers, layer_idx, hidden, kwargs, writer):
        out = process(self, layers, layer_idx, hidden, kwargs, writer)
        after[layer_idx] = [h.clone() for h in hidden]
        return out

    monkeypatch.setattr(StreamingMerger, "_embed", record_blocks)
    monkeypatch.setattr(StreamingMerger, "_process_layer", record_layer)
    run_cli(src, tmp_path / "out", N, merge_args, "--one-shot")
    source = load(src)[0]
    outputs: dict[int, torch.Tensor] = {}
    handles = [layer.register_forward_hook(lambda _m, _a, o, i=i: outputs.__setitem__(i, o))
               for i, layer in enumerate(source.model.layers)]
    try:
        with torch.no_grad():
            source(blocks[0])
    finally:
        for h in handles:
            h.remove()
    for i in range(config["num_hidden_layers"]):
        got = torch.cat(after[i]).reshape(outputs[i].shape)
        assert torch.allclose(got, outputs[i], atol=1e-4, rtol=1e-4), (i, float((got - outputs[i]).abs().max()))


def test_an_interrupted_mxfp4_merge_resumes_to_the_uninterrupted_result(calib_file, tmp_path, monkeypatch):
    """Fused MXFP4 experts are written one row at a time; a merge killed after layer 1 and resumed writes the same
    bytes as one that ran through."""
    src = build_tiny_moe(tmp_path / "src", "gpt_oss", num_layers=4, mxfp4=True)
    reference = tmp_path / "reference"
    merge_checkpoint(resume_request(src, reference, calib_file))
    out = tmp_path / "out"
    crash_after_layer(monkeypatch, resume_request(src, out, calib_file))
    calls = count_method_calls(monkeypatch)
    merge_checkpoint(resume_request(src, out, calib_file, resume=True))
    assert calls == [2, 3]  # layers 0 and 1 were not merged again
    assert_identical(out, reference)


def test_top_k_and_its_alias_are_clamped_together(gpt_oss_models, merge_args, tmp_path):
    out = tmp_path / "out"
    run_cli(gpt_oss_models["bf16"], out, 1, merge_args, "--method", "f-prune")
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == 1 and config["num_experts_per_tok"] == config["experts_per_token"] == 1
    model, info = load(out)
    assert not any(info.values()), info
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


def test_the_benchmark_writer_lays_gpt_oss_out_as_save_pretrained_does(tmp_path):
    saved = build_tiny_moe(tmp_path / "ref", "gpt_oss", num_layers=2)
    on_disk = {k: tuple(v.shape) for k, v in SourceCheckpoint(saved).tensors.items()}
    spec = spec_for(json.loads((saved / "config.json").read_text()))
    assert disk_layout(tiny_config("gpt_oss", 2), spec) == on_disk
    fields = {**MODERN_FAMILY_CONFIGS["gpt_oss"], "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2}
    out = write_random_checkpoint(tmp_path / "random", fields)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_an_mxfp4_merge_is_evaluated_original_and_merged(gpt_oss_models, calib_file, tmp_path, monkeypatch):
    """lm-eval runs the MXFP4 original and the re-quantized merge (stock transformers dequantizes both)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the original's scores are cached there
    out = tmp_path / "out"
    argv = [str(gpt_oss_models["mxfp4"]), "--keep", str(KEEP), "--output-dir", str(out), "--no-push",
            "--calibration", str(calib_file), "--num-samples", "4", "--seq-len", "64", "-q", "--device", "cpu",
            "--tasks", "demo_mc", "--include-path", str(task_dir()), "--limit", "8"]
    assert main(argv) == 0
    results = json.loads((out / "eval_results.json").read_text())
    for which in ("original", "merged"):
        assert 0 <= results[which]["demo_mc"]["acc"] <= 1
