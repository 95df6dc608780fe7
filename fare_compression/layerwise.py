"""Layer-by-layer calibration: one decoder layer's activations on the accelerator at a time.

The inputs of decoder layer 0 are captured once (each layer temporarily replaced by a stand-in
that records the hidden states and the keyword arguments the decoder passes it: attention mask
of its layer type, position embeddings, ...). Then for i = 0..L-1: layer i is moved to the compute
device (when its weights live on CPU), run on its inputs with the method's statistics hooks,
compressed, optionally run again (``sequential``: the next layer sees the *compressed* layer's
outputs, as Wanda/SparseGPT do; otherwise it sees the unmodified outputs, as HC-SMoE/REAP's one
forward of the unmodified model does), moved back, and its outputs become layer i+1's inputs.
Activations between layers are kept on CPU, so peak accelerator memory is one layer's weights plus
one batch of activations and the method's statistics for that layer, independent of depth.

``pipeline="model"`` keeps the previous whole-model driver (full forwards of the model on its own
device, hooks on all layers at once for non-sequential methods, a forward stopped after layer i for
sequential ones); it gives the same results and is kept for comparison (tests, memory benchmark).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from fare_core.errors import FareError

from .calibration import CalibrationSet
from .hooks import MaskState, StopForward, run_calibration

PIPELINES = ("layerwise", "model")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device) -> torch.device:
    """"auto" -> cuda when available else cpu; "cpu", "cuda", "cuda:1", ... checked."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(device))
    except RuntimeError:
        raise FareError(f"device={device!r} is not a device; allowed: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FareError(f"device={device!r} but no CUDA device is available; use device=cpu or auto")
    return dev


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """"auto" -> bfloat16 on an accelerator, float32 on CPU; else one of :data:`DTYPES`."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or str(dtype) == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if str(dtype) not in DTYPES:
        raise FareError(f"dtype={dtype!r} is not allowed; choose one of: auto, {', '.join(DTYPES)}")
    return DTYPES[str(dtype)]


def check_pipeline(pipeline: str) -> str:
    if pipeline not in PIPELINES:
        raise FareError(f"pipeline={pipeline!r} is not allowed; choose one of: {', '.join(PIPELINES)}")
    return pipeline


def decoder(model) -> nn.Module:
    dec = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    if dec is None or getattr(dec, "layers", None) is None:
        raise FareError(f"{type(model).__name__}: no decoder .layers found; not a decoder-only causal LM")
    return dec


def decoder_layers(model) -> list[nn.Module]:
    return list(decoder(model).layers)


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type == "meta":
            raise FareError("model weights are on the meta device (disk offload); load them on CPU "
                            "(device_map=None) and let compression move one layer at a time to the accelerator")
        return t.device
    return torch.device("cpu")


@contextmanager
def onload(module: nn.Module, device: torch.device):
    """Run ``module`` on ``device`` when its weights live on CPU; leave accelerator-resident ones in place."""
    home = _device_of(module)
    target = device if home.type == "cpu" else home
    if target != home:
        module.to(target)
    try:
        yield target
    finally:
        if target != home:
            module.to(home)


def _move(obj, device, memo: dict):
    """Tensors (also inside tuples/lists/dicts) moved to ``device``; shared tensors moved once."""
    if isinstance(obj, torch.Tensor):
        key = id(obj)
        if key not in memo:
            memo[key] = (obj, obj.to(device))  # keep obj alive so its id is not reused
        return memo[key][1]
    if isinstance(obj, tuple):
        return tuple(_move(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device, memo) for k, v in obj.items()}
    return obj


class _InputCatcher(nn.Module):
    """Stand-in for decoder layer i during capture: records what the decoder passes it."""

    def __init__(self, index: int, sink: Callable, last: bool):
        super().__init__()
        self.index, self.sink, self.last = index, sink, last

    def forward(self, hidden_states, *args, **kwargs):
        self.sink(self.index, hidden_states, args, kwargs)
        if self.last:
            raise StopForward
        return hidden_states


class LayerInputs:
    """Per calibration batch: the current layer's input hidden states (CPU), the stat-token mask
    and, per decoder layer, the positional/keyword arguments the decoder gives that layer."""

    def __init__(self, model, calib: CalibrationSet, batch_size: int, device: torch.device):
        dec = decoder(model)
        layers = dec.layers
        n = len(layers)
        self.hidden: list[torch.Tensor] = []
        self.stat: list[torch.Tensor] = []
        self.call: list[list[tuple]] = []  # [batch][layer] -> (args, kwargs) on CPU
        memo: dict = {}  # per batch: a mask shared by layers of one type is stored once

        def sink(i, hidden, args, kwargs):
            if i == 0:
                memo.clear()
                self.hidden.append(hidden.detach().to("cpu"))
            self.call[-1].append(_move((args, kwargs), torch.device("cpu"), memo))

        originals = list(layers)
        # embeddings, rotary embedding, final norm: computed on `device` when they live on CPU
        others = [m for name, m in dec.named_children() if name != "layers"]
        homes = [_device_of(m) for m in others]
        emb = model.get_input_embeddings()
        emb_home = _device_of(emb)
        dev_in = device if emb_home.type == "cpu" else emb_home
        try:
            for i in range(n):
                layers[i] = _InputCatcher(i, sink, i == n - 1)
            for m, home in zip(others, homes):
                if home.type == "cpu":
                    m.to(device)
            with torch.no_grad():
                for ids, attn, stat in calib.batches(batch_size):
                    self.call.append([])
                    self.stat.append(stat.reshape(-1))
                    try:
                        model(input_ids=ids.to(dev_in), attention_mask=attn.to(dev_in), use_cache=False)
                    except StopForward:
                        pass
        finally:
            for i, layer in enumerate(originals):
                layers[i] = layer
            for m, home in zip(others, homes):
                m.to(home)

    def run(self, index: int, layer: nn.Module, device: torch.device, state: MaskState | None,
            keep: bool = True) -> list[torch.Tensor]:
        """Run ``layer`` (decoder layer ``index``) on every batch; returns its outputs (CPU; none
        when ``keep`` is False: a statistics pass whose outputs a second pass will replace)."""
        outs = []
        with torch.no_grad():
            for b, hidden in enumerate(self.hidden):
                memo: dict = {}
                args, kwargs = _move(self.call[b][index], device, memo)
                if state is not None:
                    state.flat, state.shape = self.stat[b].to(device), tuple(hidden.shape[:2])
                try:
                    out = layer(hidden.to(device), *args, **kwargs)
                finally:
                    if state is not None:
                        state.flat = None
                if keep:
                    out = out[0] if isinstance(out, tuple) else out
                    outs.append(out.detach().to("cpu"))
        return outs


class Progress:
    """One line per finished layer at most every ``every`` seconds (and the last), also off a terminal."""

    def __init__(self, what: str, total: int, enabled: bool = True, every: float = 10.0):
        self.what, self.total, self.enabled, self.every = what, total, enabled, every
        self.t0 = self.last = time.perf_counter()

    def step(self, done: int) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < self.every and done < self.total):
            return
        self.last = now
        el = now - self.t0
        eta = el / done * (self.total - done) if done else 0.0
        print(f"{self.what}: layer {done}/{self.total} done, {el:.1f} s elapsed, ETA {eta:.0f} s",
              file=sys.stderr, flush=True)


def visit_layers(model, calib: CalibrationSet | None, process: Callable, collect: Callable | None = None, *,
                 sequential: bool, device=None, batch_size: int = 4, pipeline: str = "layerwise",
                 what: str = "compress", progress: bool = True) -> None:
    """Drive a per-decoder-layer compression.

    collect(i, layer, state) -> object with ``.remove()``: registers the statistics hooks of layer i
    (they read the stat-token mask from ``state.flat``); process(i, layer, collected_or_None)
    compresses layer i in place (with its weights on the compute device). ``calib=None``: no
    forward at all (data-free methods), each layer is just visited on the compute device.
    """
    check_pipeline(pipeline)
    layers = decoder_layers(model)
    n = len(layers)
    prog = Progress(what, n, progress)
    if pipeline == "model":
        _visit_whole_model(model, calib, process, collect, sequential, batch_size, layers, prog)
        return
    dev = resolve_device(device)
    if calib is None or collect is None:
        for i, layer in enumerate(layers):
            with onload(layer, dev):
                process(i, layer, None)
            prog.step(i + 1)
        return
    inputs = LayerInputs(model, calib, batch_size, dev)
    state = MaskState()
    for i, layer in enumerate(layers):
        with onload(layer, dev) as here:
            rerun = sequential and i < n - 1  # the next layer must see this layer compressed
            handle = collect(i, layer, state)
            try:
                outs = inputs.run(i, layer, here, state, keep=not rerun)
            finally:
                handle.remove()
            process(i, layer, handle)
            del handle
            if rerun:
                outs = inputs.run(i, layer, here, None)
        inputs.hidden = outs
        prog.step(i + 1)


def _visit_whole_model(model, calib, process, collect, sequential, batch_size, layers, prog) -> None:
    if calib is None or collect is None:
        for i, layer in enumerate(layers):
            process(i, layer, None)
            prog.step(i + 1)
        return
    state = MaskState()
    if sequential:
        for i, layer in enumerate(layers):
            handle = collect(i, layer, state)
            try:
                run_calibration(model, calib, state, batch_size, stop_after=layer)
            finally:
                handle.remove()
            process(i, layer, handle)
            prog.step(i + 1)
        return
    handles = [collect(i, layer, state) for i, layer in enumerate(layers)]
    try:
        run_calibration(model, calib, state, batch_size)
    finally:
        for h in handles:
            h.remove()
    for i, layer in enumerate(layers):
        process(i, layer, handles[i])
        prog.step(i + 1)
