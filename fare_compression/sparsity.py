"""Unstructured and N:M weight sparsity with routed experts included (compression_specs.md section 6).

Targets: every ``nn.Linear`` inside the decoder layers (attention, dense/shared MLPs; never
routers nor the 1-output ``shared_expert_gate``; never embeddings or ``lm_head``) plus every
routed expert's ``gate_up_proj[e]`` ([2I,H], rows are outputs) and ``down_proj[e]`` ([H,I]).

* magnitude (wanda repo ``prune_magnitude``): zero the int(s * numel) smallest |W| of each matrix;
  N:M: the N smallest |W| of every M consecutive input columns of each row.
* Wanda (Sun et al. 2023): S_ij = |W_ij| * ||X_j||_2; per output row zero the int(s * d_in)
  lowest; N:M per row-group; no weight update.
* SparseGPT (Frantar & Alistarh 2023, ``fasterprune``): H = 2/n sum x x^T, dead columns zeroed,
  damping 0.01 * mean diag H, upper Cholesky of H^-1, columns in blocks of 128; mask per block =
  the lowest s fraction of w^2 / [H^-1]_jj^2 over the block (exactly int(s * numel), the reference's
  ``<=`` threshold can take one more), N:M per row-group; OBS error propagation.

Calibrated methods run sequentially, decoder layer by decoder layer: layer l's statistics come
from the model whose layers < l are already pruned (forward stops after layer l). Expert statistics
use every stat token for every expert (``tokens="all"``, llm-compressor's moe_calibrate_all_experts
default) or only the tokens routed to it (``tokens="routed"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fare_core.adapters import model_type_of, moe_layers

from .calibration import CalibrationSet
from .expert_prune import check_ratio
from .hooks import MaskState, check_layout, expert_hidden, run_calibration

METHODS = ("magnitude", "wanda", "sparsegpt")
TOKEN_MODES = ("all", "routed")


@dataclass
class Target:
    name: str
    layer: int
    module: nn.Module  # the Linear, or the experts container
    expert: int | None = None  # expert id for fused tensors
    part: str = "weight"  # "weight" | "gate_up_proj" | "down_proj"

    @property
    def weight(self) -> torch.Tensor:
        if self.expert is None:
            return self.module.weight.data
        return getattr(self.module, self.part).data[self.expert]


def parse_structure(structure) -> tuple[int, int]:
    """"unstructured" -> (0, 0); "N:M" (e.g. "2:4") -> (N, M)."""
    if structure in (None, "unstructured", "0:0"):
        return 0, 0
    try:
        n, m = (int(v) for v in str(structure).split(":"))
    except ValueError:
        raise ValueError(f"structure={structure!r}; allowed: unstructured or N:M such as 2:4") from None
    if not 0 < n < m:
        raise ValueError(f"structure={structure!r}: need 0 < N < M")
    return n, m


def decoder_layers(model) -> list[nn.Module]:
    dec = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = getattr(dec, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder .layers found")
    return list(layers)


def targets(model) -> dict[int, list[Target]]:
    """Prunable matrices per decoder layer index."""
    moe = {l.index: l for l in moe_layers(model)}
    mt = model_type_of(model)
    out: dict[int, list[Target]] = {}
    for i, dl in enumerate(decoder_layers(model)):
        ts = []
        routers = {id(moe[i].router)} if i in moe else set()
        experts = moe[i].experts if i in moe else None
        for name, mod in dl.named_modules():
            if isinstance(mod, nn.Linear) and id(mod) not in routers and mod.out_features > 1:
                if i in moe and mod.out_features == moe[i].num_experts and "gate" in name:
                    continue  # a Linear router
                ts.append(Target(f"layers.{i}.{name}", i, mod))
        if experts is not None:
            check_layout(moe[i], mt)
            for e in range(moe[i].num_experts):
                for part in ("gate_up_proj", "down_proj"):
                    ts.append(Target(f"layers.{i}.experts.{e}.{part}", i, experts, e, part))
        out[i] = ts
    return out


# ----------------------------------------------------------------------------- masks


def _lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k lowest entries of a flat score (stable: lower index first on ties)."""
    m = torch.zeros(score.numel(), dtype=torch.bool)
    if k > 0:
        m[torch.argsort(score.flatten(), stable=True)[:k]] = True
    return m.view(score.shape)


def score_mask(score: torch.Tensor, ratio: float, n: int, m: int, per_row: bool) -> torch.Tensor:
    """Pruning mask (True = zero) from a score: N:M groups, per row, or over the whole matrix."""
    rows, cols = score.shape
    if n:
        g = score.reshape(rows, cols // m, m)
        idx = torch.argsort(g, dim=-1, stable=True)[..., :n]
        return torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True).reshape(rows, cols)
    if per_row:
        k = int(cols * ratio)
        idx = torch.argsort(score, dim=1, stable=True)[:, :k]
        return torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)
    return _lowest(score, int(score.numel() * ratio))


@torch.no_grad()
def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, ratio: float, n: int = 0, m: int = 0,
                    blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """SparseGPT ``fasterprune`` on W [rows, cols] with Hessian H [cols, cols]; returns the new W."""
    W = W.double().clone()
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    cols = W.shape[1]
    damp = percdamp * torch.mean(torch.diag(H))
    for attempt in range(5):
        try:
            L = torch.linalg.cholesky(H + damp * (10 ** attempt) * torch.eye(cols, dtype=H.dtype))
            Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
            break
        except RuntimeError:
            continue
    else:
        raise RuntimeError("SparseGPT: Hessian not positive definite even with 10^4 x damping")
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if n == 0:
            mask1 = _lowest(W1 ** 2 / d.reshape(1, -1) ** 2, int(W1.numel() * ratio))
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            if n != 0 and i % m == 0:
                tmp = W1[:, i:i + m] ** 2 / d[i:i + m].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.argsort(tmp, dim=1, stable=True)[:, :n], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d[i]
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


# ----------------------------------------------------------------------------- statistics


class _Stats:
    """Per target: sum_j x_j^2 (Wanda) or sum x x^T (SparseGPT) and the token count."""

    def __init__(self, kind: str):
        self.kind, self.acc, self.n = kind, None, 0

    def add(self, x: torch.Tensor) -> None:
        x = x.double()
        v = (x * x).sum(0) if self.kind == "wanda" else x.T @ x
        self.acc = v if self.acc is None else self.acc + v
        self.n += x.shape[0]

    def wanda_norm(self, cols: int) -> torch.Tensor:
        return torch.zeros(cols, dtype=torch.float64) if self.acc is None else self.acc.sqrt()

    def hessian(self, cols: int) -> torch.Tensor:
        if self.acc is None or self.n == 0:
            return torch.zeros(cols, cols, dtype=torch.float64)
        return 2 * self.acc / self.n


def _collect(model, calib, layer_module, ts: list[Target], kind: str, tokens: str, batch_size: int):
    state = MaskState()
    stats = {t.name: _Stats(kind) for t in ts}
    handles = []
    for t in ts:
        if t.expert is None:
            def pre(mod, args, t=t):
                x = args[0]
                x = x.reshape(-1, x.shape[-1])
                if state.flat is not None and x.shape[0] == state.flat.numel():
                    x = x[state.flat]
                stats[t.name].add(x.detach().cpu())
            handles.append(t.module.register_forward_pre_hook(pre))
    exp_ts = [t for t in ts if t.expert is not None]
    if exp_ts:
        ex = exp_ts[0].module

        def epre(mod, args):
            x, idx = args[0], args[1]
            m = state.flat
            x, idx = x.reshape(-1, x.shape[-1])[m], idx.reshape(-1, idx.shape[-1])[m]
            for e in range(mod.gate_up_proj.shape[0]):
                xe = x if tokens == "all" else x[(idx == e).any(-1)]
                stats[f"{_prefix(exp_ts[0])}.{e}.gate_up_proj"].add(xe.detach().cpu())
                stats[f"{_prefix(exp_ts[0])}.{e}.down_proj"].add(expert_hidden(mod, e, xe).detach().cpu())
        handles.append(ex.register_forward_pre_hook(epre))
    try:
        run_calibration(model, calib, state, batch_size, stop_after=layer_module)
    finally:
        for h in handles:
            h.remove()
    return stats


def _prefix(t: Target) -> str:
    return t.name.rsplit(".", 2)[0]


@torch.no_grad()
def sparsify(model, method: str, ratio=0.5, structure="unstructured", calib: CalibrationSet | None = None,
             tokens: str = "all", batch_size: int = 4, blocksize: int = 128, percdamp: float = 0.01):
    """Prune weights in place with ``method`` in {magnitude, wanda, sparsegpt}; returns (model, info)."""
    if method not in METHODS:
        raise ValueError(f"unknown sparsity method {method!r}; allowed: {', '.join(METHODS)}")
    n, m = parse_structure(structure)
    ratio = n / m if n else check_ratio(ratio)
    if tokens not in TOKEN_MODES:
        raise ValueError(f"tokens={tokens!r}; allowed: {', '.join(TOKEN_MODES)}")
    per_layer = targets(model)
    if n:
        for ts in per_layer.values():
            for t in ts:
                cols = t.weight.shape[1]
                if cols % m:
                    raise ValueError(f"{structure} sparsity needs the input dimension divisible by {m}; "
                                     f"{t.name} has {cols} input columns")
    if method != "magnitude" and calib is None:
        raise ValueError(f"{method} needs a calibration set")
    dls = decoder_layers(model)
    pruned = 0
    total = 0
    for i, ts in per_layer.items():
        if not ts:
            continue
        stats = None if method == "magnitude" else _collect(model, calib, dls[i], ts, method, tokens, batch_size)
        for t in ts:
            W = t.weight
            if method == "magnitude":
                mask = score_mask(W.abs().float(), ratio, n, m, per_row=False)
                new = W.masked_fill(mask.to(W.device), 0)
            elif method == "wanda":
                norm = stats[t.name].wanda_norm(W.shape[1]).to(W.device)
                mask = score_mask((W.double().abs() * norm.view(1, -1)), ratio, n, m, per_row=True)
                new = W.masked_fill(mask.to(W.device), 0)
            else:
                H = stats[t.name].hessian(W.shape[1])
                new = sparsegpt_prune(W.cpu(), H, ratio, n, m, blocksize, percdamp).to(W.device, W.dtype)
            W.copy_(new)
            pruned += int((W == 0).sum())
            total += W.numel()
    info = {"method": method, "ratio": ratio, "structure": "unstructured" if not n else f"{n}:{m}",
            "expert_tokens": tokens, "sequential": method != "magnitude", "zero_fraction": pruned / max(total, 1)}
    return model, info


def run(model, calib=None, tokenizer=None, method="magnitude", **params):
    """Registry adapter (methods.py)."""
    return sparsify(model, method, calib=calib, **params)
