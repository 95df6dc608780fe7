"""Load a model for compression: dtype/device defaults and where the weights live.

By default (``device_map=None``) the weights are loaded on CPU in ``dtype`` (bfloat16 when the
compute device is an accelerator, float32 on CPU) and compression moves one decoder layer at a time
to the compute device (:mod:`fare_compression.layerwise`), so a model larger than the accelerator
can be compressed; any ``from_pretrained`` ``device_map`` ("auto", "cuda", a dict) keeps the weights
where it puts them instead (layers already on an accelerator are computed in place).
"""

from __future__ import annotations

from fare_core.errors import FareError
from fare_core.tiny import check_pretrained, is_tiny_spec, resolve_pretrained

from .layerwise import resolve_device, resolve_dtype


def load_model(spec: str, device="auto", dtype="auto", device_map=None, revision: str | None = None):
    """(model in eval mode, tokenizer, model id to record) for ``spec`` (hub id, folder, fare-tiny[:type])."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if not is_tiny_spec(spec):
        check_pretrained(spec)
    path, model_id = resolve_pretrained(spec)
    kwargs = {"dtype": dt}
    if revision and not is_tiny_spec(spec):
        kwargs["revision"] = revision
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
        tokenizer = AutoTokenizer.from_pretrained(path, **({"revision": kwargs["revision"]} if "revision" in kwargs else {}))
    except OSError as e:  # not on the hub / offline / no weights in the folder: the library's first line
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise FareError(f"--model {spec!r} could not be loaded: {first}") from e
    return model, tokenizer, model_id
