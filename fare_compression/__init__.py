"""fare-moe compression: quantisation, sparsity, expert pruning and merging for MoE models.

Entry points (the same options everywhere: ``device``, ``dtype``, ``device_map``; compression runs
decoder layer by decoder layer, see :mod:`fare_compression.layerwise`)::

    apply_compression(model, "wanda", {"ratio": 0.5, "calib_p": 0.25}, tokenizer, device="cuda") -> model
    compress_checkpoint("org/model", "wanda", {...}, out="DIR", device="auto", dtype="auto",
                        device_map=None, overwrite=False) -> manifest      # what `fare compress` runs
    load_model("org/model", device="auto", dtype="auto", device_map=None) -> (model, tokenizer, model_id)

A checkpoint written by ``save_compressed`` / ``compress_checkpoint`` loads with ``from_pretrained``;
call ``reapply_from_manifest(model, path)`` after loading it (re-quantises bitsandbytes checkpoints,
a no-op otherwise). The method's record (parameters, calibration manifest, per-layer details) is left on
``model.fare_compression`` (a dict) for the caller to save or log.
"""

from __future__ import annotations

from .checkpoint import compress_checkpoint, read_manifest, reapply_from_manifest, save_compressed
from .loading import load_model
from .methods import METHODS, MissingBackendError, apply_compression

__all__ = ["METHODS", "MissingBackendError", "apply_compression", "compress_checkpoint", "load_model",
           "read_manifest", "reapply_from_manifest", "save_compressed"]
