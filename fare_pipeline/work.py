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


def _clock(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


class Heartbeat:
    """Context manager: a daemon thread logs ``[name] running 1m30s: <status>`` every ``interval`` s.

    For output that is not a terminal (CI, nohup, log files), where progress bars are off. The
    status is the loop currently reporting through :meth:`Heartbeat.report` (e.g. ``test evaluation
    batch 12/40``), plus ``extra()`` when given (e.g. decoder-layer work so far).
    """

    current: tuple[str, int, int | None] | None = None  # (what, done, total) of the running loop

    def __init__(self, name: str, log, interval: float = 30.0, extra=None):
        import threading

        self.name, self.log, self.interval, self.extra = name, log, float(interval), extra
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{name}", daemon=True)

    @classmethod
    def report(cls, what: str, done: int, total: int | None = None) -> None:
        """Record the progress of the loop that is running now (cheap; called once per batch)."""
        cls.current = (what, done, total)

    @classmethod
    def track(cls, items, what: str, total: int | None = None):
        """Yield from ``items`` while reporting ``what i/n`` (n = ``total`` or ``len(items)`` when known)."""
        total = len(items) if total is None and hasattr(items, "__len__") else total
        i = -1
        for i, item in enumerate(items):
            cls.report(what, i, total)
            yield item
        cls.report(what, total if total is not None else i + 1, total)

    def line(self, elapsed: float) -> str:
        parts = [f"[{self.name}] running {_clock(elapsed)}"]
        if Heartbeat.current is not None:
            what, done, total = Heartbeat.current
            parts.append(f"{what} {done}/{total} batches" if total else f"{what} {done} batches")
        if self.extra is not None:
            parts.append(self.extra())
        return parts[0] + (": " + ", ".join(parts[1:]) if len(parts) > 1 else "")

    def _beat(self):
        import time

        t0 = time.perf_counter()
        while not self._stop.wait(self.interval):
            self.log(self.line(time.perf_counter() - t0))

    def __enter__(self):
        Heartbeat.current = None
        if self.interval > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        Heartbeat.current = None
        return False
