"""GPTQ W4A16 / W8A16 through llm-compressor (compression_specs.md section 7; compression_libs.md).

GPTQ (Frantar et al. 2022): per Linear, H = 2 X X^T / n, dampening ``dampening_frac`` * mean diag H,
columns quantised in blocks of ``block_size`` with OBS error propagation through the Cholesky factor
of H^-1. llm-compressor's ``GPTQModifier`` with its presets: W4A16 = int4 symmetric, W8A16 = int8 symmetric,
both group-wise with group size 128 in compressed-tensors 0.19 (``group_size`` overrides it; it must
divide every quantised Linear's input dimension).

MoE handling: the fused experts are linearised into per-expert ``nn.Linear`` (llm-compressor's
``linearize_moe``), ``moe_calibrate_all_experts=True`` runs every expert on every calibration token
(no expert is left with an empty Hessian), routers / ``shared_expert_gate`` / ``lm_head`` are
ignored. The saved compressed-tensors checkpoint is re-fused by transformers on load. Mixtral:
llm-compressor writes ``gate_proj/up_proj/down_proj`` under ``block_sparse_moe.experts.N`` where
transformers expects ``w1/w3/w2``; :func:`fix_mixtral_keys` renames them after saving (tested
workaround from compression_libs.md). Calibration uses every non-padding token (llm-compressor has
no per-token statistics mask), so ``calib_stats_tokens="refusal"`` is refused.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from fare_core.errors import FareError

from .calibration import CalibrationSet

SCHEMES = {"W4A16": 4, "W8A16": 8}
#: llm-compressor's sequential pipeline onloads one decoder layer at a time to its main device
#: (the first accelerator) and offloads the activations between layers to CPU.
LLMC_PIPELINES = {"layerwise": "sequential", "model": "basic"}
IGNORE = ["lm_head", "re:.*mlp.gate$", "re:.*router$", "re:.*shared_expert_gate$"]


def _scheme(scheme: str, group_size: int):
    """Preset name, or with a non-default group size the equivalent explicit config group."""
    if group_size != 128:
        return None, {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": SCHEMES[scheme], "type": "int", "symmetric": True, "strategy": "group",
            "group_size": group_size}}}
    return scheme, None


def gptq(model, calib: CalibrationSet, tokenizer=None, scheme: str = "W4A16", dampening_frac: float = 0.01,
         block_size: int = 128, batch_size: int = 1, group_size: int = 128, pipeline: str = "layerwise"):
    """Quantise ``model`` in place (fake-quantised in memory; compressed on save); returns (model, info)."""
    import datasets
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from llmcompressor.modifiers.quantization import GPTQModifier

    if scheme not in SCHEMES:
        raise FareError(f"GPTQ scheme={scheme!r}; allowed: {', '.join(SCHEMES)}")
    if not isinstance(group_size, int) or group_size < 1:
        raise FareError(f"group_size={group_size!r} must be a positive integer")
    if calib.manifest.get("stats_tokens") != "all":
        raise FareError("GPTQ calibrates on every non-padding token; calib_stats_tokens='refusal' is not supported")
    if True:  # every quantised Linear input dim must split into whole groups
        bad = [(n, m.in_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lm_head" not in n and m.in_features % group_size]
        exp = [(n, m.down_proj.shape[-1]) for n, m in model.named_modules()
               if isinstance(getattr(m, "down_proj", None), torch.Tensor) and m.down_proj.shape[-1] % group_size]
        if bad or exp:
            name, dim = (bad + exp)[0]
            raise FareError(f"{scheme} group_size={group_size} does not divide the input dimension {dim} of {name}; "
                             "pass group_size dividing every Linear input dimension")
    linearize_moe(model)
    ds = datasets.Dataset.from_dict({"input_ids": calib.input_ids.tolist(),
                                     "attention_mask": calib.attention_mask.tolist()})
    preset, groups = _scheme(scheme, group_size)
    kw = {"scheme": preset} if groups is None else {"config_groups": groups}
    recipe = GPTQModifier(targets="Linear", ignore=IGNORE, dampening_frac=dampening_frac, block_size=block_size, **kw)
    # oneshot re-reads the config from config.name_or_path: give in-memory models a readable one
    name = model.config.name_or_path
    with tempfile.TemporaryDirectory() as tmp:
        if not (Path(str(name)) / "config.json").is_file():
            model.config.save_pretrained(tmp)
            model.config.name_or_path = tmp
        try:
            oneshot(model=model, dataset=ds, processor=tokenizer, recipe=recipe, num_calibration_samples=len(calib),
                    max_seq_length=calib.input_ids.shape[1], moe_calibrate_all_experts=True,
                    shuffle_calibration_samples=False, batch_size=batch_size,
                    pipeline=LLMC_PIPELINES[pipeline], sequential_offload_device="cpu")
        finally:
            model.config.name_or_path = name
    from llmcompressor.utils.dev import get_main_device

    info = {"library": "llmcompressor", "pipeline": LLMC_PIPELINES[pipeline], "device": str(get_main_device()),
            "scheme": scheme, "group_size": group_size, "dampening_frac": dampening_frac, "block_size": block_size,
            "ignore": IGNORE, "moe_calibrate_all_experts": True, "experts": "linearized per-expert Linear"}
    return model, info


def release_session(model) -> None:
    """Drop what llm-compressor keeps of ``model`` after ``oneshot`` (its global session, and the
    namespace of its traced forward, which holds ``self``), so that a saved model can be freed."""
    import gc

    from llmcompressor.core import active_session

    active_session().reset()
    for ref in gc.get_referrers(model):
        if isinstance(ref, dict) and "__name__" in ref and ref.get("self") is model:
            del ref["self"]


def fix_mixtral_keys(out_dir: Path) -> int:
    """Rename block_sparse_moe.experts.N.{gate,up,down}_proj -> w1/w3/w2 in saved safetensors."""
    from safetensors.torch import load_file, save_file

    ren = {".gate_proj.": ".w1.", ".up_proj.": ".w3.", ".down_proj.": ".w2."}
    changed = 0
    index_path = out_dir / "model.safetensors.index.json"
    for f in sorted(out_dir.glob("*.safetensors")):
        sd = load_file(str(f))
        new = {}
        for k, v in sd.items():
            nk = k
            if "block_sparse_moe.experts." in k:
                for a, b in ren.items():
                    nk = nk.replace(a, b)
            changed += nk != k
            new[nk] = v
        if changed:
            save_file(new, str(f), metadata={"format": "pt"})
    if changed and index_path.exists():
        idx = json.loads(index_path.read_text())
        wm = {}
        for k, v in idx["weight_map"].items():
            nk = k
            if "block_sparse_moe.experts." in k:
                for a, b in ren.items():
                    nk = nk.replace(a, b)
            wm[nk] = v
        idx["weight_map"] = wm
        index_path.write_text(json.dumps(idx, indent=2))
    return changed


def run(model, calib=None, tokenizer=None, scheme="W4A16", dampening_frac=0.01, block_size=128, batch_size=1,
        group_size=128, device=None, pipeline="layerwise", progress=True):
    """Registry adapter (methods.py). The compute device is llm-compressor's main device."""
    return gptq(model, calib, tokenizer, scheme, dampening_frac, block_size, batch_size, group_size, pipeline)
