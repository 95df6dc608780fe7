"""fare-moe compression: quantisation, sparsity, expert pruning and merging for MoE models.

Entry point for the ``fare_moe`` lm-eval model and the ``fare compress`` CLI::

    apply_compression(model, "wanda", {"ratio": 0.5, "calib_p": 0.25}, tokenizer) -> model

A checkpoint written by ``save_compressed`` / ``fare compress`` loads with ``from_pretrained``;
call ``reapply_from_manifest(model, path)`` after loading it (re-quantises bitsandbytes checkpoints,
a no-op otherwise). The method's record (parameters, calibration manifest, per-layer details) is left on
``model.fare_compression`` (a dict) for the caller to save or log.
"""

from __future__ import annotations

from .checkpoint import read_manifest, reapply_from_manifest, save_compressed
from .methods import METHODS, MissingBackendError, apply_compression

__all__ = ["METHODS", "MissingBackendError", "apply_compression", "read_manifest", "reapply_from_manifest",
           "save_compressed"]
