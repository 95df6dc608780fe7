"""Save a compressed model as a ``from_pretrained`` checkpoint with a manifest, and verify the reload.

Layout of ``out_dir``: the HF checkpoint (config, safetensors, tokenizer) plus ``fare_compression.json``
(:data:`MANIFEST`): method, parameters, per-method details, the calibration manifest (p, N, length,
token counts per source, seed), device/dtype/pipeline, library versions and the reload check.
Saving per method:

* GPTQ: compressed-tensors (``save_compressed=True``; transformers + compressed-tensors reload it);
  Mixtral keys renamed (:func:`fare_compression.gptq.fix_mixtral_keys`);
* bitsandbytes: the dequantised weights in the original layout, ``reapply_on_load`` set so that
  :func:`reapply_from_manifest` re-quantises on load (idempotent, see bnb.py);
* everything else: an ordinary ``save_pretrained`` (pruned experts => smaller config and tensors).

Everything is written into a temporary sibling folder ``.<name>.tmp-<pid>``, reloaded with
``output_loading_info=True`` (missing or unexpected keys are an error), given normal permissions
(safetensors writes 0600) and only then renamed to ``out_dir``: an interrupted save leaves no
half-written checkpoint. ``out_dir`` must be new or empty unless ``overwrite=True`` (then the old
folder is replaced as a whole, after the new one is complete); an existing file is refused.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from pathlib import Path

from fare_core.errors import FareError
from fare_core.files import check_writable_dir, normal_permissions, package_versions, remove_stale_temps

MANIFEST = "fare_compression.json"
FORMAT = "fare-compression/1"


def check_reload(out_dir: Path):
    """Reload ``out_dir``; raise when any key is missing or unexpected. Returns (model, loading_info)."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype="auto", output_loading_info=True)
    bad = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    bad = {k: v for k, v in bad.items() if v}
    if bad:
        raise RuntimeError(f"{out_dir}: the saved checkpoint does not reload cleanly: {bad}")
    return model.eval(), info


def check_out_dir(out_dir, overwrite: bool = False) -> Path:
    """``out_dir`` as a Path when it may be written; FareError (before any work) otherwise."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise FareError(f"--out {str(out_dir)!r} is an existing file; allowed: a new or empty folder "
                        "(or an existing folder with --overwrite)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FareError(f"--out {str(out_dir)!r} is a folder that is not empty; allowed: a new or empty folder, "
                        "or pass --overwrite (overwrite=True) to replace it")
    check_writable_dir(out.absolute().parent, "the parent of --out")  # the temp folder goes there
    return out


def _write(model, tokenizer, out: Path, base: str | None) -> dict:
    """Write checkpoint files + manifest into ``out`` (an existing empty folder); returns the manifest."""
    record = getattr(model, "fare_compression", None)
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
    manifest = {
        "format": FORMAT, "base_model": base, **record, "reapply_on_load": reapply,
        "saved_as": "compressed-tensors" if method.startswith("gptq") else
        ("dequantized weights; re-quantise on load" if reapply else "dense safetensors"),
        "reload_check": {"missing_keys": [], "unexpected_keys": []},
        "versions": package_versions(["torch", "transformers", "accelerate", "bitsandbytes", "llmcompressor",
                                      "compressed-tensors"]),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def _tmp_dir(out: Path) -> Path:
    remove_stale_temps(out)  # left by a killed earlier `fare compress` (dead pid only)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``out`` (replacing an allowed existing folder as a whole)."""
    normal_permissions(tmp)
    check_out_dir(out, overwrite)  # again: someone may have written there meanwhile
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_compressed(model, tokenizer, out_dir, base: str | None = None, overwrite: bool = False) -> dict:
    """Write ``model`` (already compressed by apply_compression) + tokenizer + manifest atomically into
    ``out_dir`` and verify the reload; returns the manifest."""
    if getattr(model, "fare_compression", None) is None:
        raise FareError("model carries no fare_compression record: run apply_compression first")
    out = check_out_dir(out_dir, overwrite)
    tmp = _tmp_dir(out)
    try:
        manifest = _write(model, tokenizer, tmp, base)
        check_reload(tmp)
        _publish(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def compress_checkpoint(model: str, method: str, params: dict | None, out, *, device="auto", dtype="auto",
                        device_map=None, revision: str | None = None, overwrite: bool = False,
                        pipeline: str | None = None, progress: bool = True) -> dict:
    """Load ``model`` (hub id, local folder, fare-tiny[:type]), compress it layer by layer with
    ``method``/``params`` on ``device``, save it atomically to ``out`` and verify the reload.

    device: "auto" | "cpu" | "cuda" | "cuda:N"; dtype: "auto" (bfloat16 on GPU, float32 on CPU) or a
    name; device_map: None (weights on CPU, one layer at a time on ``device``) or any
    ``from_pretrained`` device_map. ``out`` must be new or empty unless ``overwrite``. Returns the manifest.
    """
    from .layerwise import resolve_device, resolve_dtype
    from .loading import load_model
    from .methods import METHODS, apply_compression, check_params, require_backends

    out_path = check_out_dir(out, overwrite)  # everything that needs no model is checked before loading it
    check_params(method, params, device, pipeline)
    resolve_dtype(dtype, resolve_device(device))
    require_backends(method, METHODS[method].backends)
    m, tok, base = load_model(model, device=device, dtype=dtype, device_map=device_map, revision=revision)
    apply_compression(m, method, params or {}, tok, device=device, pipeline=pipeline, progress=progress)
    m.fare_compression.update(base_revision=revision, device_map=device_map)
    tmp = _tmp_dir(out_path)
    try:
        manifest = _write(m, tok, tmp, base)
        if method.startswith("gptq"):
            from .gptq import release_session

            release_session(m)
        del m  # the reload check then never holds two copies of a large model
        gc.collect()
        check_reload(tmp)
        _publish(tmp, out_path, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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
