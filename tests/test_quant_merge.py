"""Quantized sources end to end: tiny FP8-block DeepSeek-V3 and GLM-4.5 checkpoints in the Hub's on-disk layout
(per-expert FP8 keys with `weight_scale_inv`, attention FP8 too, norms, routers and embeddings not quantized),
merged through the CLI and loaded back with stock `from_pretrained` on the CPU (which dequantizes); the MXFP4
reader and writer on a tiny tensor file in gpt-oss' key layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_refusals import refuse
from test_resume import assert_identical, count_method_calls, crash_after_layer
from transformers import AutoModelForCausalLM

from hc_smoe_hub.architectures import spec_for
from hc_smoe_hub.calibration import CalibrationSpec
from hc_smoe_hub.card_writer import checkpoint_size
from hc_smoe_hub.checkpoint import OutputTensor, SourceCheckpoint
from hc_smoe_hub.cli import main
from hc_smoe_hub.merge import MergeRequest, merge_checkpoint
from hc_smoe_hub.quant import Fp8BlockFormat, Mxfp4Format, output_config
from hc_smoe_hub.quant.io import QuantSource, QuantWriter, disk_plan
from hc_smoe_hub.synthetic import build_tiny_moe

IDS = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
FMT = Fp8BlockFormat()
# family -> (N, a K < N its grouped routing accepts)
FAMILIES = {"deepseek_v3": (16, 8), "glm4_moe": (8, 4), "minimax_m2": (8, 4)}
# GLM-4.5's hidden size 256 gives its experts and attention two 128-wide blocks along one dim (DeepSeek-V3's one)
HIDDEN = {"deepseek_v3": 32, "glm4_moe": 256, "minimax_m2": 32}
MTP_LAYER = 3  # the tiny checkpoints have 3 decoder layers and one MTP layer, which the merge drops


@pytest.fixture(scope="module")
def fp8_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp8")
    return {fam: build_tiny_moe(root / fam, fam, hidden=HIDDEN[fam], dtype=torch.bfloat16, fp8=True,
                                max_shard_size="200KB") for fam in FAMILIES}


def run_cli(src: Path, out: Path, keep: int, merge_args: list[str], *extra: str) -> dict:
    assert main([str(src), "--keep", str(keep), "--output-dir", str(out), *merge_args, *extra]) == 0
    return json.loads((out / "hc_smoe.json").read_text())


def load(directory: Path, source: bool = False):
    """A stock CPU load (FP8 dequantized by transformers); an output must match the class exactly, a source has
    its MTP layer's tensors left over."""
    model, info = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert source or not info["unexpected_keys"], info
    return model.eval()


def is_expert(key: str) -> bool:
    return ".mlp.experts." in key or ".block_sparse_moe.experts." in key


def test_synthetic_fp8_checkpoint_is_in_the_hub_layout(fp8_models):
    ckpt = SourceCheckpoint(fp8_models["deepseek_v3"])
    t = ckpt.tensors
    for key in ("model.layers.1.mlp.experts.5.down_proj.weight", "model.layers.1.self_attn.kv_b_proj.weight",
                "model.layers.1.mlp.shared_experts.up_proj.weight", "model.layers.0.mlp.gate_proj.weight"):
        assert t[key].dtype == "F8_E4M3" and t[key + "_scale_inv"].dtype == "F32", key
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                "model.layers.1.input_layernorm.weight"):
        assert t[key].dtype == "BF16" and key + "_scale_inv" not in t, key
    glm = SourceCheckpoint(fp8_models["glm4_moe"]).tensors
    assert glm["model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv"].shape == (1, 2)
    assert glm["model.layers.1.mlp.experts.0.down_proj.weight_scale_inv"].shape == (2, 1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_keeping_every_expert_requantized_reproduces_the_source(family, fp8_models, merge_args, tmp_path):
    src, out = fp8_models[family], tmp_path / "out"
    n, _ = FAMILIES[family]
    prov = run_cli(src, out, n, merge_args)
    a, b = SourceCheckpoint(src), SourceCheckpoint(out)
    kept = {k for k in a.tensors if not k.startswith(f"model.layers.{MTP_LAYER}.")}
    assert set(b.tensors) == kept
    # every tensor, FP8 experts and their scales included, byte for byte: an unchanged expert keeps its bytes
    assert all(b"".join(a.copy_raw(k)) == b"".join(b.copy_raw(k)) for k in kept)
    src_cfg, out_cfg = (json.loads((d / "config.json").read_text()) for d in (src, out))
    assert out_cfg["quantization_config"] == src_cfg["quantization_config"]
    with torch.no_grad():
        assert torch.equal(load(out)(IDS).logits, load(src, source=True)(IDS).logits)
    assert prov["architecture"]["weights_format"]["output"] == "re-quantized"


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("paper", [False, True], ids=["default", "paper"])
def test_merged_experts_are_requantized_and_load_with_stock_transformers(family, paper, fp8_models, merge_args,
                                                                         tmp_path):
    src, out = fp8_models[family], tmp_path / "out"
    n, k = FAMILIES[family]
    prov = run_cli(src, out, k, merge_args, *(["--paper"] if paper else []))
    a, b = SourceCheckpoint(src), SourceCheckpoint(out)
    spec = spec_for(json.loads((src / "config.json").read_text()))
    disk = b.read(b.keys())
    for layer in (1, 2):
        for e in range(n):
            for key in spec.expert_keys(layer, e):
                if e < k:
                    assert disk[key].dtype == torch.float8_e4m3fn and disk[key + "_scale_inv"].dtype == torch.float32
                    assert disk[key].shape == a.tensors[key].shape
                else:
                    assert key not in disk and key + "_scale_inv" not in disk
        assert disk[spec.router_key(layer)].shape[0] == k
    # what the merge does not change is copied still quantized, byte for byte (attention, shared experts, norms)
    routers = {spec.router_key(layer) for layer in range(3)} | {spec.bias_key(layer) for layer in range(3)}
    unchanged = [key for key in b.tensors if not is_expert(key) and key not in routers]
    assert any(b.tensors[key].dtype == "F8_E4M3" for key in unchanged)
    assert all(b"".join(a.copy_raw(key)) == b"".join(b.copy_raw(key)) for key in unchanged)
    # the experts' share of the disk shrinks by K/N exactly (same shapes, same format per expert)
    moe = [key for key in a.tensors if is_expert(key) and not key.startswith(f"model.layers.{MTP_LAYER}.")]
    assert sum(b.tensors[key].nbytes for key in b.tensors if is_expert(key)) * n == \
        sum(a.tensors[key].nbytes for key in moe) * k
    model = load(out)
    params = dict(model.named_parameters())
    inter = a.tensors[spec.expert_keys(1, 0)[0]].shape[0]
    for layer in (1, 2):
        gate_up = params[f"model.layers.{layer}.{spec.moe_module}.experts.gate_up_proj"]
        down = params[f"model.layers.{layer}.{spec.moe_module}.experts.down_proj"]
        assert gate_up.shape[0] == k and down.shape[0] == k
        for e in range(k):
            gate, up, down_key = spec.expert_keys(layer, e)
            assert torch.equal(gate_up[e, :inter], FMT.dequantize(disk, gate))
            assert torch.equal(gate_up[e, inter:], FMT.dequantize(disk, up))
            assert torch.equal(down[e], FMT.dequantize(disk, down_key))
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    weights = prov["architecture"]["weights_format"]
    assert weights["output"] == "re-quantized" and weights["source_format"].startswith("fp8 e4m3, 128x128")
    assert "**Quantized weights:**" in (out / "README.md").read_text()
    # the card counts parameters in their unquantized shapes: the scale tensors are not parameters
    assert checkpoint_size(out)[0] == sum(t.numel() for t in model.state_dict().values())


def test_dtype_bfloat16_writes_the_whole_model_dequantized(fp8_models, merge_args, tmp_path):
    src, out = fp8_models["deepseek_v3"], tmp_path / "out"
    prov = run_cli(src, out, 8, merge_args, "--dtype", "bfloat16")
    a, b = SourceCheckpoint(src), SourceCheckpoint(out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert not any(key.endswith("_scale_inv") for key in b.tensors)
    assert {t.dtype for t in b.tensors.values()} <= {"BF16", "F32"}  # F32: the router's score bias, as stored
    key = "model.layers.1.self_attn.kv_b_proj.weight"
    assert torch.equal(b.read([key])[key], FMT.dequantize(a.read([key, key + "_scale_inv"]), key))
    model = load(out)
    assert model.model.layers[1].mlp.experts.gate_up_proj.shape[0] == 8
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()
    assert prov["architecture"]["weights_format"] == {
        "source_format": "fp8 e4m3, 128x128 block scales (weight_scale_inv)", "output": "dequantized",
        "output_format": "bfloat16"}
    assert "**Dequantized weights:**" in (out / "README.md").read_text()


def test_interrupted_fp8_merge_resumes_to_the_uninterrupted_result(fp8_models, calib_file, tmp_path, monkeypatch):
    def request(out: Path, **changes) -> MergeRequest:
        return MergeRequest(source=str(fp8_models["deepseek_v3"]), keep="8", output_dir=out,
                            calibration=CalibrationSpec(str(calib_file), 4, 64), device="cpu", **changes)

    reference, out = tmp_path / "reference", tmp_path / "out"
    merge_checkpoint(request(reference))
    crash_after_layer(monkeypatch, request(out))  # layer 0 (dense) and layer 1 (MoE) finished
    calls = count_method_calls(monkeypatch)
    merge_checkpoint(request(out, resume=True))
    assert calls == [2]
    assert_identical(out, reference)  # the re-quantized experts and their scales included


def _with_config(src: Path, dst: Path, change) -> Path:
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    change(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_quantized_sources_the_tool_cannot_read_are_refused(fp8_models, merge_args, tmp_path, capsys):
    out = tmp_path / "out"
    per_tensor = _with_config(fp8_models["deepseek_v3"], tmp_path / "per_tensor",
                              lambda c: c["quantization_config"].pop("weight_block_size"))
    refuse(capsys, [str(per_tensor), "--keep", "8", "--output-dir", str(out), *merge_args], out,
           "per-tensor scales", "block-scaled FP8")
    refuse(capsys, [str(fp8_models["deepseek_v3"]), "--keep", "8", "--output-dir", str(out), *merge_args,
                    "--dtype", "float16"], out, "--dtype float16", "--dtype bfloat16")
    unquantized = _with_config(build_tiny_moe(tmp_path / "bf16", "glm4_moe", dtype=torch.bfloat16),
                               tmp_path / "claims_fp8",
                               lambda c: c.update(quantization_config={"quant_method": "fp8",
                                                                       "weight_block_size": [128, 128]}))
    refuse(capsys, [str(unquantized), "--keep", "4", "--output-dir", str(out), *merge_args], out,
           "declares fp8 quantization but no weight", "<key>_scale_inv")
    gptq = _with_config(fp8_models["glm4_moe"], tmp_path / "gptq",
                        lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4}))
    refuse(capsys, [str(gptq), "--keep", "4", "--output-dir", str(out), *merge_args], out, "'gptq'")


def test_output_config_keeps_or_removes_quantization_config_at_both_levels():
    qcfg = {"quant_method": "fp8", "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head"]}
    config = {"model_type": "some_vlm", "quantization_config": qcfg, "text_config": {"quantization_config": qcfg}}
    assert output_config(config, keep_quantized=True) == config
    removed = output_config(config, keep_quantized=False)
    assert "quantization_config" not in removed and "quantization_config" not in removed["text_config"]
    assert config["text_config"]["quantization_config"] == qcfg  # the source's dict is not changed


# ---------------------------------------------------------------- MXFP4 (gpt-oss key layout), I/O level only

E, H, I2 = 4, 64, 128  # experts, hidden, 2 x intermediate
P = "model.layers.0.mlp."


@pytest.fixture()
def gpt_oss_file(tmp_path) -> Path:
    """One gpt-oss MoE layer's tensors as the Hub stores them: MXFP4 experts, bf16 biases and router."""
    fmt = Mxfp4Format()
    g = torch.Generator().manual_seed(0)
    tensors = {**fmt.quantize(torch.randn(E, H, I2, generator=g), P + "experts.gate_up_proj"),
               **fmt.quantize(torch.randn(E, I2 // 2, H, generator=g), P + "experts.down_proj"),
               P + "experts.gate_up_proj_bias": torch.randn(E, I2, generator=g).to(torch.bfloat16),
               P + "router.weight": torch.randn(E, H, generator=g).to(torch.bfloat16)}
    folder = tmp_path / "gptoss"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_mxfp4_reader_lists_logical_keys_and_reads_one_expert(gpt_oss_file):
    raw = SourceCheckpoint(gpt_oss_file)
    src = QuantSource(raw, Mxfp4Format(), torch.float32)
    assert set(src.keys()) == {P + "experts.gate_up_proj", P + "experts.down_proj", P + "experts.gate_up_proj_bias",
                               P + "router.weight"}
    assert src.tensors[P + "experts.gate_up_proj"].shape == (E, H, I2)
    assert src.tensors[P + "experts.down_proj"].shape == (E, I2 // 2, H)
    assert src.tensors[P + "experts.gate_up_proj"].dtype == "F32"
    key = P + "experts.gate_up_proj"
    whole = Mxfp4Format().dequantize(raw.read(Mxfp4Format().tensor_keys(key)), key, torch.float32)
    assert torch.equal(src.read([key])[key], whole)
    assert torch.equal(src.read([key], index=2)[key], whole[2])  # only expert 2's blocks and scales are read
    router = P + "router.weight"
    assert torch.equal(src.read([router], index=1)[router], raw.read([router])[router][1])


@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16], ids=["requantized", "dequantized"])
def test_mxfp4_writer_plans_and_writes_fused_experts(gpt_oss_file, tmp_path, out_dtype):
    fmt = Mxfp4Format()
    src = QuantSource(SourceCheckpoint(gpt_oss_file), fmt, torch.float32)
    keep = 2
    gate_up, down = P + "experts.gate_up_proj", P + "experts.down_proj"
    logical = [OutputTensor(gate_up, "F32", (keep, H, I2)), OutputTensor(down, "F32", (E, I2 // 2, H)),
               OutputTensor(P + "router.weight", "BF16", (keep, H))]
    plan = disk_plan(logical, src, out_dtype)
    shapes = {t.name: (t.dtype, t.shape) for t in plan}
    if out_dtype is None:
        assert shapes[gate_up + "_blocks"] == ("U8", (keep, I2, H // 32, 16))
        assert shapes[gate_up + "_scales"] == ("U8", (keep, I2, H // 32))
        assert shapes[down + "_blocks"] == ("U8", (E, H, I2 // 2 // 32, 16))
    else:
        assert shapes[gate_up] == ("BF16", (keep, H, I2)) and shapes[down] == ("BF16", (E, I2 // 2, H))
    out = tmp_path / "out"
    out.mkdir()
    writer = QuantWriter(out, plan, 1 << 30, source=src, out_dtype=out_dtype)
    merged = torch.randn(keep, H, I2, generator=torch.Generator().manual_seed(1))
    writer.write(gate_up, merged)
    writer.write_chunks(down, src.copy_raw(down))  # unchanged by the merge
    router = torch.randn(keep, H).to(torch.bfloat16)
    writer.write(P + "router.weight", router)
    writer.finish()
    written = SourceCheckpoint(out)
    if out_dtype is None:
        assert torch.equal(QuantSource(written, fmt, torch.float32).read([gate_up])[gate_up],
                           fmt.dequantize(fmt.quantize(merged, gate_up), gate_up, torch.float32))
        for key in fmt.tensor_keys(down):  # copied byte for byte, still quantized
            assert b"".join(written.copy_raw(key)) == b"".join(src.inner.copy_raw(key))
    else:
        got = written.read([gate_up, down])
        assert torch.equal(got[gate_up], merged.to(torch.bfloat16))
        assert torch.equal(got[down], src.read_as(down, torch.bfloat16))
    assert torch.equal(written.read([P + "router.weight"])[P + "router.weight"], router)
