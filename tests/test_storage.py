"""Expert storage strategies (`hc_smoe_hub/arch/storage.py`): every layout reads one expert at a time into the
engine's (gate, up, down) and writes merged experts back in the same layout, byte for byte."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from test_refusals import refuse
from transformers import AutoConfig

from hc_smoe_hub.arch.storage import Fused, PerExpert
from hc_smoe_hub.checkpoint import OutputTensor, ShardedWriter, SourceCheckpoint, dtype_name
from hc_smoe_hub.errors import SourceError
from hc_smoe_hub.routing import Experts
from hc_smoe_hub.synthetic import build_tokenizer

N, INTER, H = 5, 6, 4
BASE = "model.layers.0.mlp."


def _experts(n: int = N, seed: int = 0) -> Experts:
    g = torch.Generator().manual_seed(seed)
    shapes = ((n, INTER, H), (n, INTER, H), (n, H, INTER))
    return Experts(*(torch.randn(s, generator=g).to(torch.bfloat16) for s in shapes))


def _stored(storage, experts: Experts) -> dict[str, torch.Tensor]:
    """The experts in the layout a checkpoint of `storage` holds, built independently of the strategy's code."""
    if isinstance(storage, PerExpert):
        return {k: m[e] for e in range(experts.count)
                for k, m in zip(storage.expert_keys(BASE, e), (experts.gate, experts.up, experts.down), strict=True)}
    if storage.interleaved:
        gate_up = torch.empty(experts.count, 2 * INTER, H, dtype=experts.gate.dtype)
        gate_up[:, 0::2], gate_up[:, 1::2] = experts.gate, experts.up
    else:
        gate_up = torch.cat((experts.gate, experts.up), dim=1)
    down = experts.down
    if storage.transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    return {BASE + storage.gate_up: gate_up.contiguous(), BASE + storage.down: down.contiguous()}


STORAGES = {
    "per-expert": PerExpert(),
    "fused": Fused(),
    "granite": Fused(gate_up="input_linear.weight", down="output_linear.weight"),
    "transposed": Fused(transposed=True),
    "transposed-interleaved": Fused(transposed=True, interleaved=True),
}


@pytest.mark.parametrize("name", sorted(STORAGES))
def test_read_one_expert_and_write_back_in_the_same_layout(name, tmp_path):
    storage = STORAGES[name]
    experts = _experts()
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    save_file(_stored(storage, experts), str(src_dir / "model.safetensors"))
    src = SourceCheckpoint(src_dir)
    keys = storage.keys(BASE, N)
    assert sorted(keys) == sorted(src.tensors)
    storage.check(src, BASE, N)
    for e in range(N):
        gate, up, down = storage.read_expert(src, BASE, e, "cpu")
        assert torch.equal(gate, experts.gate[e]) and torch.equal(up, experts.up[e])
        assert torch.equal(down, experts.down[e])
    keep = 3
    shapes = storage.output_shapes(BASE, N, keep, {k: src.tensors[k].shape for k in keys})
    merged = _experts(keep, seed=1)
    expected = _stored(storage, merged)
    assert shapes == {k: tuple(v.shape) for k, v in expected.items()}
    out = tmp_path / "out"
    out.mkdir()
    plan = [OutputTensor(k, dtype_name(torch.bfloat16), s) for k, s in sorted(shapes.items())]
    writer = ShardedWriter(out, plan, max_shard_bytes=1 << 20)
    storage.write(writer, BASE, merged)
    writer.finish()
    written = SourceCheckpoint(out).read(sorted(shapes))
    assert all(torch.equal(written[k], expected[k]) for k in expected)


def test_fused_check_names_a_wrong_expert_count(tmp_path):
    storage = Fused()
    save_file(_stored(storage, _experts()), str(tmp_path / "model.safetensors"))
    with pytest.raises(SourceError, match=r"not \(8, \., \.\) for 8 fused experts"):
        storage.check(SourceCheckpoint(tmp_path), BASE, 8)
    with pytest.raises(SourceError, match="missing"):
        Fused(gate_up="input_linear.weight").check(SourceCheckpoint(tmp_path), BASE, N)


def test_a_fused_tensor_is_written_only_when_every_row_is(tmp_path):
    writer = ShardedWriter(tmp_path, [OutputTensor("w", "BF16", (2, INTER, H))], max_shard_bytes=1 << 20)
    writer.write_rows("w", 1, torch.zeros(INTER, H, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="never written"):
        writer.finish()
    with pytest.raises(ValueError, match="planned rows"):
        writer.write_rows("w", 0, torch.zeros(INTER, H))  # fp32, planned bf16
    writer.write_rows("w", 0, torch.ones(INTER, H, dtype=torch.bfloat16))
    writer.finish()
    got = SourceCheckpoint(tmp_path).read(["w"])["w"]
    assert torch.equal(got[0], torch.ones(INTER, H, dtype=torch.bfloat16)) and not got[1].any()


def test_llama4_is_refused_with_the_reason(tmp_path, capsys, merge_args):
    src = tmp_path / "llama4"
    AutoConfig.for_model("llama4", text_config={"num_local_experts": 4, "hidden_size": 16}).save_pretrained(src)
    build_tokenizer(src)
    out = tmp_path / "out"
    refuse(capsys, [str(src), "--keep", "2", "--output-dir", str(out), *merge_args], out,
           "Llama 4", "multiplies each expert's INPUT", "not supported", "Granite")
