"""Unstructured and N:M weight sparsity with routed experts included (compression_specs.md section 6).

Targets (logical matrices, each pruned separately): every ``nn.Linear`` inside the decoder layers
(attention projections, dense/shared MLPs; never routers nor the 1-output ``shared_expert_gate``;
never embeddings or ``lm_head``) plus, per routed expert e, ``gate`` = ``gate_up_proj[e, :I]``,
``up`` = ``gate_up_proj[e, I:]`` (the fused [2I,H] tensor is split as llm-compressor's per-expert
Linears and the dense references do) and ``down`` = ``down_proj[e]``.

* magnitude (wanda repo ``prune_magnitude``): zero the int(s * numel) smallest |W| of each matrix;
  N:M: the N smallest |W| of every M consecutive input columns of each row.
* Wanda (Sun et al. 2023): S_ij = |W_ij| * ||X_j||_2; per output row zero the int(s * d_in)
  lowest; N:M per row-group; no weight update.
* SparseGPT (Frantar & Alistarh 2023, ``fasterprune``): H = 2/n sum x x^T, dead columns zeroed,
  damping 0.01 * mean diag H, upper Cholesky of H^-1, columns in blocks of 128; mask per block =
  the lowest w^2 / [H^-1]_jj^2 over the block, N:M per row-group; OBS error propagation. Block b
  (columns [i1, i2)) prunes int(s * rows * i2) - int(s * rows * i1) weights, so every matrix gets
  exactly int(s * numel) zeros (the reference's per-block int(s * rows * 128) whenever that is an
  integer, e.g. s = 0.5 with an even row count; it can drift by one per block otherwise).

Calibrated methods run sequentially, decoder layer by decoder layer (:mod:`fare_compression.layerwise`):
layer l's statistics come from its inputs as produced by the already-pruned layers < l. Statistics
accumulate in float64 on the compute device. Expert statistics use every stat token for every expert
(``tokens="all"``, llm-compressor's moe_calibrate_all_experts default; gate and up share their
input statistics) or only the tokens routed to it (``tokens="routed"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fare_core.adapters import model_type_of, moe_layers
from fare_core.errors import FareError

from .calibration import CalibrationSet
from .expert_prune import check_ratio
from .hooks import MaskState, check_layout, expert_hidden
from .layerwise import decoder_layers, visit_layers

METHODS = ("magnitude", "wanda", "sparsegpt")
TOKEN_MODES = ("all", "routed")


@dataclass
class Target:
    name: str
    layer: int
    module: nn.Module  # the Linear, or the experts container
    expert: int | None = None  # expert id for fused tensors
    part: str = "weight"  # "weight" | "gate" | "up" | "down"
    stat: str = ""  # key of the input statistics (shared by matrices reading the same input)

    @property
    def weight(self) -> torch.Tensor:
        """The logical matrix (a view into the fused tensor for experts)."""
        if self.expert is None:
            return self.module.weight.data
        if self.part == "down":
            return self.module.down_proj.data[self.expert]
        gu = self.module.gate_up_proj.data[self.expert]
        half = gu.shape[0] // 2
        return gu[:half] if self.part == "gate" else gu[half:]


def parse_structure(structure) -> tuple[int, int]:
    """"unstructured" -> (0, 0); "N:M" (e.g. "2:4") -> (N, M)."""
    if structure in (None, "unstructured", "0:0"):
        return 0, 0
    try:
        n, m = (int(v) for v in str(structure).split(":"))
    except ValueError:
        raise FareError(f"structure={structure!r}; allowed: unstructured or N:M such as 2:4") from None
    if not 0 < n < m:
        raise FareError(f"structure={structure!r}: need 0 < N < M")
    return n, m


def targets(model, tokens: str = "all") -> dict[int, list[Target]]:
    """Prunable logical matrices per decoder layer index."""
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
                ts.append(Target(f"layers.{i}.{name}", i, mod, stat=f"layers.{i}.{name}"))
        if experts is not None:
            check_layout(moe[i], mt)
            for e in range(moe[i].num_experts):
                x_in = f"layers.{i}.experts.in" if tokens == "all" else f"layers.{i}.experts.{e}.in"
                for part in ("gate", "up", "down"):
                    stat = f"layers.{i}.experts.{e}.down_in" if part == "down" else x_in
                    ts.append(Target(f"layers.{i}.experts.{e}.{part}_proj", i, experts, e, part, stat))
        out[i] = ts
    return out


# ----------------------------------------------------------------------------- masks


def _lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k lowest entries of a flat score (stable: lower index first on ties)."""
    m = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
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
    """SparseGPT ``fasterprune`` on W [rows, cols] with Hessian H [cols, cols] (float64 on W's device);
    returns the new W. Unstructured: exactly int(ratio * numel) zeros (module docstring)."""
    W = W.double().clone()
    H = H.to(W.device).double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    cols = W.shape[1]
    damp = percdamp * torch.mean(torch.diag(H))
    for attempt in range(5):
        try:
            L = torch.linalg.cholesky(H + damp * (10 ** attempt) * torch.eye(cols, dtype=H.dtype, device=H.device))
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
            rows = W1.shape[0]
            mask1 = _lowest(W1 ** 2 / d.reshape(1, -1) ** 2, int(ratio * rows * i2) - int(ratio * rows * i1))
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
    """Per input: sum_j x_j^2 (Wanda) or sum x x^T (SparseGPT) in float64 and the token count."""

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


class StatsCollector:
    """Statistics hooks on one decoder layer's targets (Linear inputs; experts' inputs and
    intermediate activations), reading the stat-token mask from ``state.flat``."""

    def __init__(self, ts: list[Target], kind: str, tokens: str, state: MaskState):
        self.stats = {t.stat: _Stats(kind) for t in ts}
        self._handles = []
        seen = set()
        for t in ts:
            if t.expert is None and id(t.module) not in seen:
                seen.add(id(t.module))
                self._handles.append(t.module.register_forward_pre_hook(self._linear_hook(t.stat, state)))
        exp = [t for t in ts if t.expert is not None]
        if exp:
            prefix = exp[0].stat.rsplit(".experts.", 1)[0] + ".experts"

            def epre(mod, args):
                m = state.flat
                x, idx = args[0], args[1]
                x, idx = x.reshape(-1, x.shape[-1])[m], idx.reshape(-1, idx.shape[-1])[m]
                if tokens == "all":
                    self.stats[f"{prefix}.in"].add(x.detach())
                for e in range(mod.gate_up_proj.shape[0]):
                    xe = x if tokens == "all" else x[(idx == e).any(-1)]
                    if tokens != "all":
                        self.stats[f"{prefix}.{e}.in"].add(xe.detach())
                    self.stats[f"{prefix}.{e}.down_in"].add(expert_hidden(mod, e, xe).detach())

            self._handles.append(exp[0].module.register_forward_pre_hook(epre))

    def _linear_hook(self, key: str, state: MaskState):
        def pre(mod, args):
            x = args[0]
            x = x.reshape(-1, x.shape[-1])
            if state.flat is not None and x.shape[0] == state.flat.numel():
                x = x[state.flat]
            self.stats[key].add(x.detach())
        return pre

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@torch.no_grad()
def prune_target(t: Target, method: str, ratio: float, n: int, m: int, stats: dict | None,
                 blocksize: int = 128, percdamp: float = 0.01) -> None:
    """Prune one logical matrix in place."""
    W = t.weight
    if method == "magnitude":
        new = W.masked_fill(score_mask(W.abs().float(), ratio, n, m, per_row=False), 0)
    elif method == "wanda":
        norm = stats[t.stat].wanda_norm(W.shape[1]).to(W.device)
        new = W.masked_fill(score_mask(W.double().abs() * norm.view(1, -1), ratio, n, m, per_row=True), 0)
    else:
        H = stats[t.stat].hessian(W.shape[1])
        new = sparsegpt_prune(W, H, ratio, n, m, blocksize, percdamp).to(W.dtype)
    W.copy_(new)


@torch.no_grad()
def sparsify(model, method: str, ratio=0.5, structure="unstructured", calib: CalibrationSet | None = None,
             tokens: str = "all", batch_size: int = 4, blocksize: int = 128, percdamp: float = 0.01,
             device=None, pipeline: str = "layerwise", progress: bool = True):
    """Prune weights in place with ``method`` in {magnitude, wanda, sparsegpt}; returns (model, info)."""
    if method not in METHODS:
        raise FareError(f"unknown sparsity method {method!r}; allowed: {', '.join(METHODS)}")
    n, m = parse_structure(structure)
    ratio = n / m if n else check_ratio(ratio)
    if tokens not in TOKEN_MODES:
        raise FareError(f"tokens={tokens!r} is not allowed; choose one of: {', '.join(TOKEN_MODES)}")
    per_layer = targets(model, tokens)
    if n:
        for ts in per_layer.values():
            for t in ts:
                cols = t.weight.shape[1]
                if cols % m:
                    raise FareError(f"{structure} sparsity needs the input dimension divisible by {m}; "
                                    f"{t.name} has {cols} input columns")
    if method != "magnitude" and calib is None:
        raise FareError(f"{method} needs a calibration set")
    counts = {"pruned": 0, "total": 0}

    def collect(i, layer, state):
        return StatsCollector(per_layer.get(i, []), method, tokens, state)

    def process(i, layer, col):
        for t in per_layer.get(i, []):
            prune_target(t, method, ratio, n, m, col.stats if col is not None else None, blocksize, percdamp)
            counts["pruned"] += int((t.weight == 0).sum())
            counts["total"] += t.weight.numel()

    visit_layers(model, calib if method != "magnitude" else None, process,
                 collect if method != "magnitude" else None, sequential=True, device=device,
                 batch_size=batch_size, pipeline=pipeline, what=method, progress=progress)
    info = {"method": method, "ratio": ratio, "structure": "unstructured" if not n else f"{n}:{m}",
            "expert_tokens": tokens, "sequential": method != "magnitude",
            "matrices": "gate, up, down of every expert and every decoder Linear pruned separately",
            "zero_fraction": counts["pruned"] / max(counts["total"], 1)}
    return model, info


def run(model, calib=None, tokenizer=None, method="magnitude", **params):
    """Registry adapter (methods.py)."""
    return sparsify(model, method, calib=calib, **params)
