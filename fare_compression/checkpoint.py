"""Save a compressed model as a ``from_pretrained`` checkpoint with a manifest, and verify the reload.

Layout of ``out_dir``: the HF checkpoint (config, safetensors, tokenizer) plus ``fare_compression.json``
(:data:`MANIFEST`): method, parameters, per-method details, the calibration manifest (p, N, length,
token counts per source, seed), library versions and the reload check. Saving per method:

* GPTQ: compressed-tensors (``save_compressed=True``; transformers + compressed-tensors reload it);
  Mixtral keys renamed (:func:`fare_compression.gptq.fix_mixtral_keys`);
* bitsandbytes: the dequantised weights in the original layout, ``reapply_on_load`` set so that
  :func:`reapply_from_manifest` re-quantises on load (idempotent, see bnb.py);
* everything else: an ordinary ``save_pretrained`` (pruned experts => smaller config and tensors).

Every save is reloaded with ``output_loading_info=True``; missing or unexpected keys are an error.
"""

from __future__ import annotations

import json
from pathlib import Path

from fare_core.files import package_versions

MANIFEST = "fare_compression.json"
FORMAT = "fare-compression/1"


def check_reload(out_dir: Path):
    """Reload ``out_dir``; raise when any key is missing or unexpected. Returns (model, loading_info)."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(out_dir), output_loading_info=True)
    bad = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    bad = {k: v for k, v in bad.items() if v}
    if bad:
        raise RuntimeError(f"{out_dir}: the saved checkpoint does not reload cleanly: {bad}")
    return model.eval(), info


def save_compressed(model, tokenizer, out_dir, base: str | None = None) -> dict:
    """Write ``model`` (already compressed by apply_compression) + tokenizer + manifest; verify reload."""
    record = getattr(model, "fare_compression", None)
    if record is None:
        raise ValueError("model carries no fare_compression record: run apply_compression first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    method = record["method"]
    reapply = False
    if method.startswith("gptq"):
        from .gptq import fix_mixtral_keys

        model.save_pretrained(str(out), save_compressed=True)
        renamed = fix_mixtral_keys(out) if model.config.model_type == "mixtral" else 0
        record.setdefault("details", {})["mixtral_keys_renamed"] = renamed
    elif method.startswith("bnb"):
        from .bnb import dense_copy

        dense_copy(model).save_pretrained(str(out))
        reapply = True
    else:
        model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    _, info = check_reload(out)
    manifest = {
        "format": FORMAT, "base_model": base, **record, "reapply_on_load": reapply,
        "saved_as": "compressed-tensors" if method.startswith("gptq") else
        ("dequantized weights; re-quantise on load" if reapply else "dense safetensors"),
        "reload_check": {"missing_keys": [], "unexpected_keys": []},
        "versions": package_versions(["torch", "transformers", "bitsandbytes", "llmcompressor", "compressed-tensors"]),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def read_manifest(path) -> dict | None:
    p = Path(path) / MANIFEST
    return json.loads(p.read_text()) if p.is_file() else None


def reapply_from_manifest(model, path):
    """For checkpoints saved with ``reapply_on_load`` (bitsandbytes): quantise again; else no-op."""
    manifest = read_manifest(path)
    if not manifest or not manifest.get("reapply_on_load"):
        return model
    from .methods import apply_compression

    return apply_compression(model, manifest["method"], manifest.get("params") or {}, None)
