"""phi profile files: a safetensors tensor ``phi`` [n_layers, E] plus JSON metadata.

Metadata (safetensors header key ``fare``): format, model (id or path), model_type, layers (the
decoder-layer index of each phi row), num_experts, and anything the writer adds (weights, seeds).
Never a pickle: safetensors holds only tensors, the metadata is JSON.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fare_core.errors import FareError
from fare_core.files import atomic_write

PROFILE_FORMAT = "fare-phi/1"


@dataclass
class Profile:
    phi: torch.Tensor  # [n_layers, E]
    layers: list[int]
    model: str | None = None
    model_type: str | None = None
    extra: dict = field(default_factory=dict)

    def rows(self) -> dict[int, torch.Tensor]:
        return dict(zip(self.layers, self.phi))


def save_profile(path: str | os.PathLike, phi: torch.Tensor, layers: list[int], model_id: str | None,
                 model_type: str | None, **extra) -> Path:
    from safetensors.torch import save_file

    phi = torch.as_tensor(phi, dtype=torch.float32).contiguous()
    if phi.dim() != 2 or phi.shape[0] != len(layers):
        raise FareError(f"phi must be [len(layers)={len(layers)}, E], got {tuple(phi.shape)}")
    meta = {"format": PROFILE_FORMAT, "model": model_id, "model_type": model_type, "layers": list(map(int, layers)),
            "num_experts": int(phi.shape[1]), **extra}
    return atomic_write(path, lambda tmp: save_file({"phi": phi}, str(tmp), metadata={"fare": json.dumps(meta)}))


def load_profile(path: str | os.PathLike) -> Profile:
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise FareError(f"profile={str(p)!r}: no such file; give the phi .safetensors file written by `fare profile`")
    try:
        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
            if "phi" not in f.keys():
                raise FareError(f"profile {str(p)!r} has no 'phi' tensor (tensors: {list(f.keys())})")
            phi = f.get_tensor("phi").float()
    except SafetensorError as e:
        raise FareError(f"profile {str(p)!r} is not a safetensors file: {e}") from None
    try:
        meta = json.loads(header["fare"])
    except (KeyError, json.JSONDecodeError):
        raise FareError(f"profile {str(p)!r} has no fare JSON metadata (expected key 'fare')") from None
    if meta.get("format") != PROFILE_FORMAT:
        raise FareError(f"profile {str(p)!r} has format {meta.get('format')!r}; expected {PROFILE_FORMAT!r}")
    layers = [int(x) for x in meta.get("layers", [])]
    if phi.dim() != 2 or phi.shape[0] != len(layers):
        raise FareError(f"profile {str(p)!r}: phi shape {tuple(phi.shape)} does not match its {len(layers)} layers")
    bad = ~torch.isfinite(phi)
    if bad.any():
        row, expert = (int(i) for i in bad.nonzero()[0])
        raise FareError(
            f"profile {str(p)!r} has {int(bad.sum())} non-finite phi values (first: {float(phi[row, expert])} at layer "
            f"{layers[row]}, expert {expert}); phi must be finite: recompute it with `fare profile`"
        )
    known = {"format", "model", "model_type", "layers", "num_experts"}
    return Profile(phi, layers, meta.get("model"), meta.get("model_type"),
                   {k: v for k, v in meta.items() if k not in known})


def check_profile(profile: Profile, controller, model_id: str | None, strict_model: bool = True) -> None:
    """Raise FareError unless the profile fits the loaded model (type, model id, layers, experts)."""
    if profile.model_type and profile.model_type != controller.model_type:
        raise FareError(
            f"profile is for model_type {profile.model_type!r} ({profile.model}); the loaded model is "
            f"{controller.model_type!r} ({model_id})"
        )
    if strict_model and profile.model and model_id and _norm(profile.model) != _norm(model_id):
        raise FareError(
            f"profile was computed for model {profile.model!r}, not {model_id!r}; "
            "pass profile_check=shape to use it anyway"
        )
    for index, row in profile.rows().items():
        if index not in controller.by_index:
            raise FareError(
                f"profile has a row for layer {index}, which is not an MoE layer of this model "
                f"(MoE layers: {sorted(controller.by_index)})"
            )
        E = controller.by_index[index].num_experts
        if row.shape[0] != E:
            raise FareError(f"profile has {row.shape[0]} experts for layer {index}; the model has {E}")


def _norm(model_id: str) -> str:
    return str(model_id).rstrip("/")
