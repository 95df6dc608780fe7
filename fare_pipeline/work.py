"""Count the decoder-layer work of every forward a model runs (issue 4, "Performance").

:class:`LayerWork` hooks each decoder layer and adds, per call, the number of positions in its
hidden-state batch (``B x T``, padding included; ``B x 1`` per generated token with a KV cache).
The sum over layers is the pipeline's token-layer evaluations, whatever code path runs the layer
(full forwards, suffix re-runs from a prefix cache, profiling, generation), so a cached and a naive
pipeline are counted in the same unit by the same code.
"""

from __future__ import annotations

from .probe import decoder_parts


class LayerWork:
    """Context manager; ``token_layer_evals`` and ``layer_calls`` accumulate while it is active."""

    def __init__(self, model):
        self.layers = decoder_parts(model)[0]
        self.token_layer_evals = 0
        self.layer_calls = 0
        self._handles = []

    def _hook(self, module, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        self.token_layer_evals += hs.numel() // hs.shape[-1]
        self.layer_calls += 1

    def snapshot(self) -> dict:
        return {"token_layer_evals": self.token_layer_evals, "layer_calls": self.layer_calls}

    def __enter__(self):
        self._handles = [layer.register_forward_pre_hook(self._hook, with_kwargs=True) for layer in self.layers]
        return self

    def __exit__(self, *exc) -> bool:
        for h in self._handles:
            h.remove()
        self._handles = []
        return False
