"""Prefix caching for the probes of AALS and the lambda grid (issue 4, "Performance").

A routing edit confined to decoder layers >= l (ARR on MoE layer l, Eq. 6) cannot change the
input of layer l. :class:`PrefixCache` runs a batch once through the unmodified model, keeps the
input of every decoder layer (plus the shared per-layer kwargs: position embeddings, masks) and
re-runs only layers l..N-1, the final norm and the LM head for each probe; it counts decoder-layer
evaluations. :class:`fare_pipeline.engine.Engine` scores through it.
"""

from __future__ import annotations

import torch
from torch import nn


def decoder_parts(model: nn.Module) -> tuple[nn.ModuleList, nn.Module, nn.Module]:
    """(decoder layers, final norm, LM head) of a transformers causal LM."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    norm = getattr(decoder, "norm", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(layers, nn.ModuleList) or norm is None or head is None:
        raise ValueError(f"{type(model).__name__}: cannot find decoder layers / final norm / LM head for prefix caching")
    return layers, norm, head


class PrefixCache:
    """Inputs of every decoder layer for one batch, captured from an unmodified forward."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers, self.norm, self.head = decoder_parts(model)
        self.inputs: list[torch.Tensor | None] = []
        self.kwargs: list[dict] = []
        self.layer_evals = 0  # decoder-layer forwards run through this object
        self.logits: torch.Tensor | None = None

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
            position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Full forward (whatever edits are active), capturing each decoder layer's input.

        ``attention_mask`` may be 2-D (padding) or a prepared 4-D additive mask (tree attention,
        with ``position_ids``)."""
        n = len(self.layers)
        self.inputs, self.kwargs = [None] * n, [{} for _ in range(n)]
        handles = []

        def capture(i):
            def hook(module, args, kwargs):
                hs = args[0] if args else kwargs["hidden_states"]
                self.inputs[i] = hs
                self.kwargs[i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                self.kwargs[i]["_extra_args"] = args[1:]
            return hook

        for i, layer in enumerate(self.layers):
            handles.append(layer.register_forward_pre_hook(capture(i), with_kwargs=True))
        try:
            kw = {} if position_ids is None else {"position_ids": position_ids}
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw)
        finally:
            for h in handles:
                h.remove()
        if any(x is None for x in self.inputs):
            raise ValueError("not every decoder layer ran during the base forward; cannot cache prefixes")
        self.layer_evals += n
        self.logits = out.logits
        return out.logits

    @torch.inference_mode()
    def run_from(self, start: int) -> torch.Tensor:
        """Logits of the cached batch re-running decoder layers ``start``.. only (edits active now apply)."""
        if not self.inputs:
            raise ValueError("run() a base batch before run_from()")
        if not 0 <= start < len(self.layers):
            raise ValueError(f"start={start}; allowed: 0..{len(self.layers) - 1}")
        h = self.inputs[start]
        for i in range(start, len(self.layers)):
            kw = dict(self.kwargs[i])
            extra = kw.pop("_extra_args", ())
            out = self.layers[i](h, *extra, **kw)
            h = out[0] if isinstance(out, tuple) else out
        self.layer_evals += len(self.layers) - start
        return self.head(self.norm(h))
