"""Layer-by-layer execution over the calibration hidden states; the whole model is never materialized.

The model skeleton is built on the meta device. The calibration blocks are embedded and every decoder layer's
keyword arguments are caught (the model's own forward computes each layer's mask and the rotary embeddings,
whatever the family; sliding-window, linear- and full-attention layers get different masks).
Then each decoder layer in turn is loaded from the shards, run over the hidden states (the MoE block's input is
recorded for the statistics), reduced by the chosen method, written out, optionally re-run with its merged
experts (sequential calibration), and freed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from hc_smoe_hub.architectures import ArchSpec
from hc_smoe_hub.checkpoint import OutputTensor, ShardedWriter, SourceCheckpoint
from hc_smoe_hub.errors import SourceError
from hc_smoe_hub.fastpath import product_dtype
from hc_smoe_hub.host_memory import release_freed_memory, reusable_heap
from hc_smoe_hub.layer_inputs import catch_layer_inputs
from hc_smoe_hub.methods import METHODS, LayerContext, LayerPlan, MethodOptions
from hc_smoe_hub.output_layout import OutputLayout
from hc_smoe_hub.routing import Experts, moe_output
from hc_smoe_hub.stats import collect

log = logging.getLogger(__name__)


class _Caught(Exception):
    def __init__(self, args: tuple, kwargs: dict):
        self.args_, self.kwargs_ = args, kwargs


@dataclass
class EngineSettings:
    keep: int
    options: MethodOptions
    device: torch.device
    compute_dtype: torch.dtype
    sequential: bool = True
    batch_tokens: int = 8192
    error_tokens: int = 1024


@dataclass
class LayerRecord:
    layer: int
    clusters: list[list[int]]
    frequencies: list[float]
    output_rel_error: float
    seconds: float
    extra: dict = field(default_factory=dict)


def _module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


class _PrecomputedExperts(nn.Module):
    """Stands in for a MoE block's routed experts and returns outputs computed beforehand, one batch per call.

    The statistics pass already runs every expert on every calibration token, so the original block's routed
    output is known; the block itself then only adds what is not routed (Qwen's gated shared expert).
    """

    def __init__(self, outputs: torch.Tensor):
        super().__init__()
        self.outputs, self.start = outputs, 0

    def forward(self, hidden_states: torch.Tensor, *_routing: Any) -> torch.Tensor:
        n = hidden_states.shape[0]
        out = self.outputs[self.start : self.start + n].to(hidden_states.dtype)
        self.start += n
        return out


class StreamingMerger:
    """Runs one merge from a source checkpoint into a planned writer."""

    def __init__(self, source: SourceCheckpoint, config: dict[str, Any], spec: ArchSpec, src_dir: str,
                 settings: EngineSettings):
        self.src, self.config, self.spec, self.s = source, config, spec, settings
        self.n_experts = spec.num_experts(config)
        self.hf_config = spec.hf_config(src_dir)
        self.hf_config._attn_implementation = spec.attn_implementation
        self.routing = spec.routing(config)  # each MoE layer adds its own selection bias, when the family has one
        self.act = spec.act(config)  # the family's gated activation strategy (F.silu for SwiGLU with silu)
        self.num_layers = spec.num_layers(config)
        self.moe_layers = [i for i in range(self.num_layers) if spec.router_key(i) in source]
        if not self.moe_layers:
            raise SourceError(f"no router weights ({spec.router_key(0)}) in the checkpoint: is it really "
                              f"a {spec.family} MoE?")
        if self.moe_layers != spec.moe_layer_ids(config):
            raise SourceError(f"the checkpoint has routers in layers {self.moe_layers} but its config.json makes "
                              f"layers {spec.moe_layer_ids(config)} MoE: the weights and config do not match")
        # The skeleton is built up front: it imports the model class, and a model transformers cannot build
        # fails here, before any calibration.
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.hf_config)
        self.storage = spec.storage_in(source, self.moe_layers[0], self.n_experts)  # the layout this source has
        for layer in self.moe_layers:
            self.storage.check(source, spec.experts_base(layer), self.n_experts)
        self.residual_scale = spec.residual_scale(config)
        self.layout = OutputLayout(spec, source, self.storage, tuple(self.moe_layers), self.num_layers,
                                   self.n_experts)

    # ---------- output plan ----------
    def output_plan(self) -> list[OutputTensor]:
        return self.layout.plan(self.s.keep)

    # ---------- run ----------
    def run(self, blocks: torch.Tensor, writer: ShardedWriter,
            on_layer: Callable[[LayerRecord], None] | None = None, *, start_layer: int = 0,
            records: list[LayerRecord] | None = None, hidden_states: list[torch.Tensor] | None = None,
            on_finished: Callable[[int, list[LayerRecord], list[torch.Tensor]], None] | None = None,
            ) -> list[LayerRecord]:
        """Merge every decoder layer from `start_layer` on; returns the records of all MoE layers.

        A resumed run passes the finished layers' `records` and the `hidden_states` that enter `start_layer`
        (the writer already holds those layers' tensors). `on_finished(next_layer, records, hidden)` is called
        after each decoder layer, once its tensors are synced to disk, so that the caller can record it.
        """
        release_freed_memory()
        dev = self.s.device
        for key in self.layout.ordered_keys():
            if not key.startswith(self.spec.layers_prefix) and not self.layout.is_extra(key):
                writer.write_chunks(key, self.src.copy_raw(key))
        writer.mark_written(k for k in writer.slots if self.layout.layer_of(k) is not None
                            and self.layout.layer_of(k) < start_layer)
        model = self.model
        rotary = model.get_submodule(self.spec.rotary_module.rpartition(".")[0])
        rotary = getattr(rotary, self.spec.rotary_module.rpartition(".")[2], None)
        if rotary is not None:  # None: a model without position embeddings (Granite 4.0 hybrids, "nope")
            # The rotary module's own config: the text config, when the model's config is a composite one.
            _set_module(model, self.spec.rotary_module, type(rotary)(config=rotary.config).to(dev))
        # The embedding pass also yields each batch's masks and rotary arguments for every decoder layer, which a
        # resumed run needs too.
        hidden, layer_kwargs = self._embed(model, blocks)
        if start_layer:
            if hidden_states is None or [h.shape for h in hidden_states] != [h.shape for h in hidden]:
                raise ValueError("the saved hidden states do not match the calibration batches")
            hidden = [h.to(dev) for h in hidden_states]
        layers = _module(model, self.spec.layers_module)
        records = list(records or [])
        for layer_idx in tqdm(range(start_layer, self.num_layers), desc="merging layers", unit="layer",
                              initial=start_layer, total=self.num_layers):
            t0 = time.perf_counter()
            kwargs = [per_layer[layer_idx] for per_layer in layer_kwargs]  # this layer's own mask, per batch
            record = self._process_layer(layers, layer_idx, hidden, kwargs, writer)
            if record is not None:
                record.seconds = time.perf_counter() - t0
                records.append(record)
                if on_layer:
                    on_layer(record)
                log.info("layer %d: %d -> %d experts, routed-output relative error %.4f (%.1fs)", layer_idx,
                         self.n_experts, self.s.keep, record.output_rel_error, record.seconds)
            if on_finished:
                writer.sync()
                on_finished(layer_idx + 1, records, hidden)
        return records

    def _embed(self, model: nn.Module, blocks: torch.Tensor) -> tuple[list[torch.Tensor], list[list[dict]]]:
        """Embed the calibration batches and catch every decoder layer's keyword arguments, per batch.

        Returns the hidden states entering layer 0 (one tensor per batch) and, per batch, one kwargs dict per
        decoder layer (`layer_inputs.catch_layer_inputs`: sliding-window, linear- and full-attention layers get
        different masks; one shared by many layers is stored once).
        """
        dev, cdt = self.s.device, self.s.compute_dtype
        embed = _module(model, self.spec.embed_module)
        prefix = (self.spec.embed_disk or self.spec.embed_module) + "."
        state = self.src.read([prefix + n for n, _ in embed.named_parameters()], dev)
        embed.load_state_dict({k[len(prefix):]: v.to(cdt) for k, v in state.items()}, assign=True)
        layers = list(_module(model, self.spec.layers_module))[: self.num_layers]
        base = _module(model, self.spec.layers_module.rpartition(".")[0])
        hidden, kwargs_list = [], []
        per_batch = max(1, self.s.batch_tokens // blocks.shape[1])
        try:
            for s in range(0, blocks.shape[0], per_batch):
                h, per_layer = catch_layer_inputs(base, layers, blocks[s : s + per_batch].to(dev))
                hidden.append(h.to(cdt))
                kwargs_list.append(per_layer)
        finally:
            embed.to("meta")
        return hidden, kwargs_list

    def _layer_state(self, layer_idx: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """On-disk tensors of one layer -> the decoder layer's in-memory state dict (the MoE block and its router
        renamed)."""
        prefix = self.spec.layer_prefix(layer_idx)
        return {self.spec.memory_name(key[len(prefix):]): value for key, value in tensors.items()}

    def _load(self, module: nn.Module, state: dict[str, torch.Tensor], skip: str | None = None) -> nn.Module:
        """Load `state` into a meta module; parameters under the prefix `skip` may stay on the meta device."""
        dev, cdt = self.s.device, self.s.compute_dtype
        # assign=True adopts the loaded tensors as parameters instead of copying them into a second buffer.
        result = module.load_state_dict({k: v.to(dev, cdt) for k, v in state.items()}, strict=skip is None,
                                        assign=True)
        if skip is not None:
            missing = [k for k in result.missing_keys if not k.startswith(skip)]
            if missing or result.unexpected_keys:
                raise SourceError(f"layer tensors do not match the model class: missing {missing[:3]}, "
                                  f"unexpected {result.unexpected_keys[:3]}")
        return module

    def _run_dense(self, module: nn.Module, state: dict, hidden: list[torch.Tensor], kwargs: list[dict]) -> None:
        """Run a whole decoder layer in place over the hidden states (layers without routed experts)."""
        self._load(module, state)
        try:
            with torch.no_grad():
                for i, (h, kw) in enumerate(zip(hidden, kwargs, strict=True)):
                    out = module(h, **kw)
                    hidden[i] = out[0] if isinstance(out, tuple) else out
        finally:
            module.to("meta")

    def _run_to_moe(self, module: nn.Module, state: dict, hidden: list[torch.Tensor],
                    kwargs: list[dict]) -> torch.Tensor:
        """Run a decoder layer up to its MoE block, in place.

        Each hidden[i] is replaced by the residual stream that enters the MoE block's norm, and the block's input
        (the normalized hidden states) is returned as one (T, H) tensor. The layer's output is then that residual
        plus the MoE block's output, so the block can be evaluated (original or merged) without re-running
        attention, and the original block need not run at all in sequential mode.
        """
        # The MoE block never runs here (its pre-hook stops the layer), so its weights are not loaded at all.
        self._load(module, state, skip=self.spec.moe_module + ".")
        norm = module.get_submodule(self.spec.moe_norm_module)
        moe = module.get_submodule(self.spec.moe_module)
        residual: list[torch.Tensor] = []
        inputs: list[torch.Tensor] = []

        def take_residual(_m, args):
            residual.append(args[0])

        def take_input(_m, args):
            inputs.append(args[0].reshape(-1, args[0].shape[-1]))
            raise _Caught((), {})

        handles = [norm.register_forward_pre_hook(take_residual), moe.register_forward_pre_hook(take_input)]
        try:
            with torch.no_grad():
                for i, (h, kw) in enumerate(zip(hidden, kwargs, strict=True)):
                    with contextlib.suppress(_Caught):
                        module(h, **kw)
                    hidden[i] = residual.pop()
        finally:
            for handle in handles:
                handle.remove()
            module.to("meta")
        return torch.cat(inputs)

    def _add_moe_block(self, layer: nn.Module, state: dict, hidden: list[torch.Tensor], x: torch.Tensor) -> None:
        """hidden[i] += block(x of batch i): finishes the decoder layer with its MoE block, plus the modules beside
        it that take the same input (`moe_siblings`), times the residual scale when the family has one."""
        names = (self.spec.moe_module, *self.spec.moe_siblings)
        parts = [layer.get_submodule(name) for name in names]
        scale = self.residual_scale
        try:
            for name, part in zip(names, parts, strict=True):
                self._load(part, {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")})
            with torch.no_grad():
                start = 0
                for i, h in enumerate(hidden):
                    n = h.shape[0] * h.shape[1]
                    xb = x[start : start + n].view(h.shape)
                    out = parts[0](xb)
                    out = out[0] if isinstance(out, tuple) else out  # gpt-oss's block also returns router scores
                    for part in parts[1:]:
                        out = out + part(xb)
                    if scale is not None:  # Granite: residual + (moe + shared_mlp) * residual_multiplier
                        out = out * scale
                    hidden[i] = h + out.to(h.dtype)
                    start += n
        finally:
            for part in parts:
                part.to("meta")

    def _process_layer(self, layers: nn.ModuleList, layer_idx: int, hidden: list[torch.Tensor],
                       kwargs: list[dict], writer: ShardedWriter) -> LayerRecord | None:
        spec, dev = self.spec, self.s.device
        prefix = spec.layer_prefix(layer_idx)
        keys = [k for k in self.src.tensors if k.startswith(prefix)]
        if layer_idx not in self.moe_layers:
            tensors = self.src.read(keys, dev)
            self._run_dense(layers[layer_idx], self._layer_state(layer_idx, tensors), hidden, kwargs)
            for key in keys:
                writer.write_chunks(key, self.src.copy_raw(key))
            return None
        expert_keys = set(self.storage.keys(spec.experts_base(layer_idx), self.n_experts))
        tensors = self.src.read([k for k in keys if k not in expert_keys], dev)
        experts = self._read_experts(layer_idx)
        router = tensors[spec.router_key(layer_idx)]
        bias_key = spec.bias_key(layer_idx)
        bias = tensors[bias_key] if bias_key else None
        lb_key = spec.logit_bias_key(layer_idx)  # the router's own bias on the logits (gpt-oss), when it has one
        logit_bias = tensors[lb_key] if lb_key else None
        routing = replace(self.routing, bias=None if bias is None else bias.float().reshape(-1),
                          logit_bias=None if logit_bias is None else logit_bias.float())
        moe_prefix = spec.moe_module + "."
        unfused = self._layer_state(layer_idx, tensors)
        pre_moe = {k: v for k, v in unfused.items() if not k.startswith(moe_prefix)}
        x = self._run_to_moe(layers[layer_idx], pre_moe, hidden, kwargs)
        freq_top_k = 2 if self.s.options.paper_frequency else None
        sample = torch.arange(0, x.shape[0], max(1, x.shape[0] // self.s.error_tokens), device=x.device)
        # The experts stay in the source dtype; every consumer converts one expert at a time to x's dtype.
        stats = collect(x, experts, router, routing, self.act, freq_top_k, sample_rows=sample)
        ctx = LayerContext(layer_idx, self.s.keep, x, experts, router, routing, self.act, stats,
                           experts_expendable=True)  # read by nothing after the method (below: shapes only)
        layer_bytes = sum(t.nbytes for t in experts.tensors())
        with reusable_heap(layer_bytes):  # a small layer's temporaries reused, not page-faulted afresh (host_memory.py)
            plan = METHODS[self.s.options.method](ctx, self.s.options)
        self._check_plan(plan, experts, router)
        del ctx, experts  # the source experts are not needed any more: free them before the layer is finished
        reduced = plan.routing(routing)
        merged_router = plan.router.to(router.dtype)
        # Sequential calibration carries the merged block's routed output on every token, computed on the fast path
        # (bf16 products for a bf16 source, as the bf16 model computes it), as the statistics pass computed the
        # original's; the recorded error compares the two on the sample, with fp32 sums.
        fast = product_dtype(plan.experts.gate.dtype, x)
        fast_or_x = None if fast == x.dtype else fast
        if self.s.sequential:
            merged_routed = moe_output(x, plan.experts, merged_router, reduced, self.act, fast_or_x)
        got = moe_output(x[sample], plan.experts, merged_router, reduced, self.act, fast_or_x)
        ref = stats.sampled_output
        error = float((got - ref).norm() / ref.norm().clamp(min=1e-12))

        merged_keys = expert_keys | {spec.router_key(layer_idx), bias_key, lb_key}
        new_bias = None if bias is None else plan.bias.to(bias.dtype).reshape(*bias.shape[:-1], self.s.keep)
        for key in keys:
            if key not in merged_keys:
                writer.write_chunks(key, self.src.copy_raw(key))
        writer.write(spec.router_key(layer_idx), merged_router)
        if bias_key:
            writer.write(bias_key, new_bias)
        if lb_key and logit_bias is not None and plan.logit_bias is not None:
            writer.write(lb_key, plan.logit_bias.to(logit_bias.dtype))
        self.storage.write(writer, spec.experts_base(layer_idx), plan.experts)
        groups, extra = plan.groups, plan.extra
        del plan

        # The decoder layer is finished by the block's own forward with its routed experts replaced by their
        # output computed above (the merged experts' in sequential mode, the original's, from the statistics pass,
        # in one-shot mode): the block adds what is not routed (a shared expert and its gate) itself, and no
        # fp32 copy of the merged experts is ever built for it.
        routed_output = merged_routed if self.s.sequential else stats.routed_output
        block = layers[layer_idx].get_submodule(spec.moe_module)
        experts_prefix = moe_prefix + spec.experts_module + "."
        finish = (moe_prefix, *(m + "." for m in spec.moe_siblings))
        block_state = {k: v for k, v in unfused.items() if k.startswith(finish) and not k.startswith(experts_prefix)}
        original = block.get_submodule(spec.experts_module)
        _set_module(block, spec.experts_module, _PrecomputedExperts(routed_output))
        try:
            self._add_moe_block(layers[layer_idx], block_state, hidden, x)
        finally:
            _set_module(block, spec.experts_module, original)
        return LayerRecord(layer_idx, groups, stats.frequencies.cpu().tolist(), error, 0.0, extra)

    def _read_experts(self, layer_idx: int) -> Experts:
        """The layer's experts stacked (N, ...) in the source dtype, read one expert at a time (whatever the storage)
        into their slots, so the layer is never held twice."""
        dev, n = self.s.device, self.n_experts
        base = self.spec.experts_base(layer_idx)
        mats: list[torch.Tensor] = []
        for e in range(n):
            one = self.storage.read_expert(self.src, base, e, dev)
            if not mats:
                mats = [torch.empty((n, *t.shape), dtype=t.dtype, device=dev) for t in one]
            for mat, t in zip(mats, one, strict=True):
                mat[e].copy_(t)
            del one
        return Experts(*mats)

    def _check_plan(self, plan: LayerPlan, experts: Experts, router: torch.Tensor) -> None:
        k = self.s.keep
        if len(plan.groups) != k or plan.experts.count != k or plan.router.shape != (k, router.shape[1]):
            raise RuntimeError(f"method {self.s.options.method} returned a plan of the wrong size")
        if plan.experts.gate.shape[1:] != experts.gate.shape[1:]:
            raise RuntimeError("merged experts changed shape")
        if plan.experts.has_bias != experts.has_bias:
            raise RuntimeError(f"method {self.s.options.method} dropped or invented the experts' biases")
