"""What a loaded model's router module computes: the probe the family tests use to check that the reduced router
routes as the merge plan says (every transformers 5 router module returns (logits, weights, indices))."""

from __future__ import annotations

import torch


def router_io(model, layer: int, path: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(router input, chosen indices, weights) of the router module at `path` in decoder layer `layer` on `ids`."""
    router = model.model.layers[layer].get_submodule(path)
    seen = {}

    def hook(_m, args, output):
        seen["x"] = args[0].reshape(-1, args[0].shape[-1])
        seen["w"], seen["i"] = output[1], output[2]

    handle = router.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    return seen["x"], seen["i"], seen["w"]
