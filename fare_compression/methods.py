"""Method registry and ``apply_compression`` (the one entry point used by fare_moe and the CLI)."""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass

from fare_core.errors import FareError

from .calibration import CALIBRATION_KEYS, calibration_from_params, check_calibration
from .layerwise import check_pipeline, resolve_device

INSTALL_HINT = "install the 'compress' extra: pip install 'fare-moe[compress]' (or pip install --no-deps -r requirements-compress.txt)"
#: Parameters every method takes (``compression_device=cuda`` in fare_moe model_args): where each
#: decoder layer is computed, and the driver (layerwise, or the whole-model one kept for comparison).
RUN_PARAMS = ("device", "pipeline")


class MissingBackendError(FareError, ImportError):
    """A compression method's library is not installed; the message names the extra to install."""


@dataclass(frozen=True)
class Method:
    func: str  # "module:function" inside fare_compression
    params: tuple[str, ...]
    calibrated: bool
    backends: tuple[str, ...] = ()  # importable module names required
    fixed: tuple = ()  # fixed keyword arguments


_SPARSE = ("ratio", "structure", "tokens", "batch_size")
METHODS: dict[str, Method] = {
    "magnitude": Method("sparsity:run", ("ratio", "structure"), False, (), (("method", "magnitude"),)),
    "wanda": Method("sparsity:run", _SPARSE, True, (), (("method", "wanda"),)),
    "sparsegpt": Method("sparsity:run", _SPARSE + ("blocksize", "percdamp"), True, (), (("method", "sparsegpt"),)),
    "prune_frequency": Method("expert_prune:run", ("ratio", "batch_size"), True, (), (("score", "frequency"),)),
    "prune_reap": Method("expert_prune:run", ("ratio", "batch_size"), True, (), (("score", "reap"),)),
    "hc_smoe": Method("hcsmoe:run", ("num_clusters", "ratio", "linkage", "cluster", "freq_topk", "seed", "batch_size"),
                      True),
    "bnb_int8": Method("bnb:run", ("threshold", "experts"), False, ("bitsandbytes",), (("bits", 8),)),
    "bnb_nf4": Method("bnb:run", ("quant_type", "double_quant", "experts"), False, ("bitsandbytes",), (("bits", 4),)),
    "gptq_w4a16": Method("gptq:run", ("dampening_frac", "block_size", "batch_size", "group_size"), True,
                         ("llmcompressor", "compressed_tensors"), (("scheme", "W4A16"),)),
    "gptq_w8a16": Method("gptq:run", ("dampening_frac", "block_size", "batch_size", "group_size"), True,
                         ("llmcompressor", "compressed_tensors"), (("scheme", "W8A16"),)),
}


def coerce(value):
    """model_args arrive as strings: "0.5" -> 0.5, "8" -> 8, "true" -> True; others unchanged."""
    if not isinstance(value, str):
        return value
    low = value.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def require_backends(method: str, names: tuple[str, ...]) -> None:
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingBackendError(f"compression method {method!r} needs {', '.join(missing)}, which is not installed; {INSTALL_HINT}")


def check_params(method: str, params: dict | None, device=None, pipeline: str | None = None):
    """Everything about a call that can be checked without a model (before a large one is loaded):
    method and parameter names, ratio, structure, calibration sizes, device and pipeline.
    Returns (coerced method + calib params, device, pipeline); FareError otherwise."""
    from .expert_prune import check_ratio
    from .sparsity import parse_structure

    if method not in METHODS:
        raise FareError(f"unknown compression method {method!r}; allowed: {', '.join(METHODS)}")
    spec = METHODS[method]
    params = {k: coerce(v) for k, v in (params or {}).items()}
    device = params.pop("device", None) if device is None else device
    pipeline = params.pop("pipeline", None) if pipeline is None else pipeline
    params.pop("device", None), params.pop("pipeline", None)
    calib_keys = {f"calib_{k}" for k in CALIBRATION_KEYS} if spec.calibrated else set()
    unknown = sorted(set(params) - set(spec.params) - calib_keys)
    if unknown:
        allowed = sorted(set(spec.params) | calib_keys | set(RUN_PARAMS))
        raise FareError(f"unknown parameter(s) {', '.join(unknown)} for method {method!r}; allowed: {', '.join(allowed)}")
    if "ratio" in params and params["ratio"] is not None:
        check_ratio(params["ratio"])
    if "structure" in params:
        parse_structure(params["structure"])
    if spec.calibrated:
        check_calibration(**{k[len("calib_"):]: v for k, v in params.items() if k.startswith("calib_")})
    return params, resolve_device(device), check_pipeline(pipeline or "layerwise")


def apply_compression(model, method: str, params: dict | None = None, tokenizer=None, *, device=None,
                      pipeline: str | None = None, progress: bool = True):
    """Compress ``model`` in place with ``method`` and its ``params``; returns the model.

    Calibrated methods take ``calib_<key>`` params (keys: n, seq_len, p, seed, general, safety,
    stats_tokens, chat). ``device`` (also accepted as ``params["device"]``): where each decoder
    layer is computed ("auto", "cpu", "cuda", "cuda:1"; default: the accelerator if there is one);
    layers whose weights live on CPU are moved there one at a time and back. ``pipeline``
    (or ``params["pipeline"]``): "layerwise" (default) or "model" (the whole-model driver, for
    comparison). The record of what was done is stored on ``model.fare_compression``.
    """
    params, dev, pipeline = check_params(method, params, device, pipeline)
    spec = METHODS[method]
    require_backends(method, spec.backends)
    module_name, _, func_name = spec.func.partition(":")
    func = getattr(importlib.import_module(f"fare_compression.{module_name}"), func_name)
    method_params = {k: v for k, v in params.items() if k in spec.params}
    calib = calibration_from_params(tokenizer, params) if spec.calibrated else None
    t0 = time.perf_counter()
    model, info = func(model, calib=calib, tokenizer=tokenizer, **dict(spec.fixed), **method_params,
                       device=dev, pipeline=pipeline, progress=progress)
    record = {"method": method, "params": method_params, "details": info,
              "seconds": round(time.perf_counter() - t0, 3), "device": str(dev), "pipeline": pipeline,
              "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    if calib is not None:
        record["calibration"] = calib.manifest
    model.fare_compression = record
    return model
