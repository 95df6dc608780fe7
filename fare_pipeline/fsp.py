"""Fairness Sensitivity Profiling (FSP; SPEC section 3, paper Eqs. 1-4) over routing aggregates.

Pure functions of the streaming aggregates of ``fare_models.surgery.Recorder``:
``counts`` [L, E, G] (tokens of group g whose top-k includes expert e), ``prob_sums`` [L, E, G]
(summed routing probabilities), ``tokens`` [L, G], and the group names (one of them neutral).
Torch tensors or numpy arrays; computed in float64.

Per layer l and expert e (demographic groups g != neutral):

* ``P(e|g) = counts[l, e, g] / tokens[l, g]``; ``P(e)`` = the same on the neutral group.
* ARD (Eq. 1): ``|P(e|g) - P(e)|`` aggregated over groups (``ard_aggregate``, default mean).
* JSD (Eq. 2): Pd, Pn = normalised selection counts of the (pooled) demographic groups and of
  the neutral group; expert value = its summand ``1/2 [Pd ln(Pd/M) + Pn ln(Pn/M)]``, M = (Pd+Pn)/2;
  the layer JSD (natural log) is their sum.
* PMI (Eq. 3): default ``log2((P(e|g)+s) / (P(e)+s))`` with P(e) pooled over all prompts,
  s = 1e-6, max over groups; ``pmi_form="printed"`` uses the paper's ``P(e)P(g)`` denominator.
* Entropy: expert value = its summand of ``H(Pd) - H(Pn)`` (weight 0 by default).
* Each metric min-max normalised across experts within a layer; phi (Eq. 4) = sum_i w_i m_i^.

Per-layer descriptors (Table 3): Gini of routing frequency f, top-10 share, Spearman rho(phi, f);
also pooled over all expert slots of the model (the scale of the paper's Table 3).
Shared experts are not in the aggregates, so they get no phi.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from scipy.special import entr, rel_entr

METRICS = ("ard", "jsd", "pmi", "ent")
DEFAULT_WEIGHTS = {"ard": 1.0, "jsd": 0.5, "pmi": 0.3, "ent": 0.0}
_CHOICES = {
    "usage": ("selection", "probability"),
    "ard_aggregate": ("mean", "max", "token_weighted"),
    "pmi_form": ("standard", "printed"),
    "pmi_baseline": ("pooled", "neutral"),
    "pmi_aggregate": ("max", "mean", "max_abs"),
    "jsd_demographic": ("pooled", "group_mean"),
    "normalization": ("minmax", "minmax_global", "none"),
    "frequency_source": ("all", "neutral", "demographic"),
    "top_share_of": ("phi", "frequency"),
}


@dataclass(frozen=True)
class FSPOptions:
    """Every reading of the paper FSP offers; defaults are the SPEC's.

    usage: build P(e|g) from top-k ``selection`` counts (default) or routing ``probability`` sums.
    ard_aggregate: over demographic groups: ``mean`` | ``max`` | ``token_weighted`` mean.
    pmi_form: ``standard`` log2(P(e|g)/P(e)) | ``printed`` log2(P(e|g)/(P(e)P(g))), P(g) = token share.
    pmi_baseline: P(e) ``pooled`` over all prompts | ``neutral`` prompts only.
    pmi_aggregate: ``max`` | ``mean`` | ``max_abs`` (the signed value of largest magnitude).
    pmi_smoothing: additive constant s on numerator and denominator.
    jsd_demographic: Pd from ``pooled`` demographic counts | ``group_mean`` of per-group distributions.
    normalization: ``minmax`` per layer across experts (paper) | ``minmax_global`` across all
        layer x expert slots (keeps layer magnitudes, so phi ranks experts across layers) |
        ``none``; a constant metric -> constant_fill.
    frequency_source: prompts whose selections define the routing frequency f.
    top_share_k / top_share_of: share of the layer's (model's) total held by its k largest values.
    """

    weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    usage: str = "selection"
    ard_aggregate: str = "mean"
    pmi_form: str = "standard"
    pmi_baseline: str = "pooled"
    pmi_aggregate: str = "max"
    pmi_smoothing: float = 1e-6
    jsd_demographic: str = "pooled"
    normalization: str = "minmax"
    constant_fill: float = 0.0
    frequency_source: str = "all"
    top_share_k: int = 10
    top_share_of: str = "phi"

    def __post_init__(self):
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; allowed: {', '.join(allowed)}")
        bad = [k for k in self.weights if k not in METRICS]
        if bad:
            raise ValueError(f"unknown FSP weight {bad[0]!r}; allowed: {', '.join(METRICS)}")
        for k, v in self.weights.items():
            if not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise ValueError(f"weight {k}={v!r}; must be a finite number")
        if not (self.pmi_smoothing >= 0 and math.isfinite(self.pmi_smoothing)):
            raise ValueError(f"pmi_smoothing={self.pmi_smoothing!r}; must be a finite number >= 0")
        if not (isinstance(self.top_share_k, int) and self.top_share_k >= 1):
            raise ValueError(f"top_share_k={self.top_share_k!r}; must be a positive integer")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["weights"] = {k: float(self.weights.get(k, 0.0)) for k in METRICS}
        return d


# --------------------------------------------------------------------------- small pure helpers


def _np(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if np.any(arr < 0):
        raise ValueError(f"{name} contains negative values; aggregates are counts and sums")
    return arr


def check_finite_phi(phi: np.ndarray, options: FSPOptions) -> None:
    """Refuse a computed phi with NaN or infinite entries (its results would look real and mean nothing)."""
    from fare_core.errors import FareError

    bad = ~np.isfinite(phi)
    if bad.any():
        l, e = (int(i) for i in np.argwhere(bad)[0])
        hint = (f"pmi_smoothing={options.pmi_smoothing:g} gives log2(0) = -inf for an expert a group never selects; "
                "use a smoothing > 0" if options.weights.get("pmi", 0) and options.pmi_smoothing == 0
                else "check the routing aggregates and FSP options")
        raise FareError(f"FSP: phi has {int(bad.sum())} non-finite values (first: layer row {l}, expert {e} = "
                        f"{phi[l, e]}); allowed: finite values only - {hint}")


def minmax(values: np.ndarray, valid: np.ndarray | None = None, constant_fill: float = 0.0) -> np.ndarray:
    """Min-max normalise each row (layer) over its valid entries (experts) to [0, 1]."""
    values = np.asarray(values, dtype=np.float64)
    valid = np.ones_like(values, dtype=bool) if valid is None else valid
    out = np.zeros_like(values)
    for i, (row, ok) in enumerate(zip(values, valid)):
        if not ok.any():
            continue
        lo, hi = row[ok].min(), row[ok].max()
        out[i, ok] = (row[ok] - lo) / (hi - lo) if hi > lo else constant_fill
    return out


def gini(x) -> float:
    """Gini coefficient of non-negative values: sum_ij |x_i - x_j| / (2 n^2 mean)."""
    x = np.sort(np.asarray(x, dtype=np.float64).ravel())
    n = x.size
    if n == 0 or x.sum() == 0:
        return float("nan")
    ranks = np.arange(1, n + 1)
    return float(2.0 * np.sum(ranks * x) / (n * x.sum()) - (n + 1.0) / n)


def top_share(x, k: int = 10) -> float:
    """Share of sum(x) held by the k largest values (1.0 when k >= len(x))."""
    x = np.asarray(x, dtype=np.float64).ravel()
    total = x.sum()
    if total == 0:
        return float("nan")
    return float(np.sort(x)[::-1][:k].sum() / total)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size)
    sx = x[order]
    i = 0
    while i < x.size:
        j = i
        while j + 1 < x.size and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.size != b.size:
        raise ValueError(f"spearman needs equal lengths; got {a.size} and {b.size}")
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float(np.sum(ra * ra) * np.sum(rb * rb)))
    return float(np.sum(ra * rb) / den) if den > 0 else float("nan")


def jsd_terms(p, q) -> np.ndarray:
    """Per-entry summands of JSD(p || q) in nats (Eq. 2) for distributions on the last axis."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    m = 0.5 * (p + q)
    return 0.5 * (rel_entr(p, m) + rel_entr(q, m))


def _normalise_dist(x: np.ndarray) -> np.ndarray:
    s = x.sum(axis=-1, keepdims=True)
    return np.divide(x, s, out=np.zeros_like(x), where=s > 0)


# --------------------------------------------------------------------------- main entry point


@dataclass
class FSPResult:
    phi: torch.Tensor  # [L, E] float64
    metrics: dict[str, np.ndarray]  # raw ard/jsd/pmi/ent and normalised *_hat, frequency, P_neutral: [L, E]
    layer: dict  # per-layer arrays: jsd, entropy_diff [L]; jsd_by_group [L, G_demo]; jsd_by_axis {axis: [L]}
    descriptors: dict  # {"layers": [...], "model": {...}}
    groups: list[str]  # demographic groups, in metric order
    layers: list[int]
    options: dict

    def write(self, out_dir, prefix: str = "fsp") -> list[Path]:
        """Write ``<prefix>_experts.csv``, ``<prefix>_layers.csv`` and ``<prefix>_descriptors.json``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cols = ["ard", "jsd", "pmi", "ent", "ard_hat", "jsd_hat", "pmi_hat", "ent_hat", "frequency"]
        phi = self.phi.numpy()
        paths = [out / f"{prefix}_experts.csv", out / f"{prefix}_layers.csv", out / f"{prefix}_descriptors.json"]
        with open(paths[0], "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["layer", "expert", "phi", *cols])
            for li, layer in enumerate(self.layers):
                for e in range(phi.shape[1]):
                    w.writerow([layer, e, repr(float(phi[li, e])), *(repr(float(self.metrics[c][li, e])) for c in cols)])
        axes = sorted(self.layer.get("jsd_by_axis", {}))
        with open(paths[1], "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            keys = ["gini", "top_share", "spearman_phi_f"]
            w.writerow(["layer", "jsd", "entropy_diff", *keys, *(f"jsd_{a}" for a in axes)])
            for li, d in enumerate(self.descriptors["layers"]):
                w.writerow([d["layer"], repr(float(self.layer["jsd"][li])), repr(float(self.layer["entropy_diff"][li])),
                            *(repr(float(d[k])) for k in keys),
                            *(repr(float(self.layer["jsd_by_axis"][a][li])) for a in axes)])
        doc = {"options": self.options, "groups": self.groups, "layers": self.layers, "descriptors": self.descriptors}
        paths[2].write_text(json.dumps(_json_safe(doc), indent=2, sort_keys=True) + "\n")
        return paths


def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def compute_fsp(
    counts,
    tokens,
    group_names: Sequence[str],
    *,
    prob_sums=None,
    neutral: str = "neutral",
    group_axes: Mapping[str, str] | None = None,
    layers: Sequence[int] | None = None,
    expert_mask=None,
    options: FSPOptions | None = None,
) -> FSPResult:
    """phi [L, E] and per-layer descriptors from routing aggregates (Eqs. 1-4).

    ``group_axes`` maps demographic group -> axis (for per-axis layer JSD); ``layers`` are the
    decoder-layer indices of the L rows (default 0..L-1); ``expert_mask`` [L, E] bool marks real
    experts when layers have different expert counts (padded experts get phi 0).
    """
    opt = options or FSPOptions()
    c = _np(counts, "counts")
    t = _np(tokens, "tokens")
    if c.ndim != 3:
        raise ValueError(f"counts must be [L, E, G]; got shape {c.shape}")
    L, E, G = c.shape
    if t.shape != (L, G):
        raise ValueError(f"tokens must be [L, G] = [{L}, {G}]; got shape {t.shape}")
    names = list(group_names)
    if len(names) != G or len(set(names)) != G:
        raise ValueError(f"group_names must be {G} distinct names (one per group column); got {names}")
    if neutral not in names:
        raise ValueError(f"neutral group {neutral!r} not among groups {names}; pass neutral=<name>")
    if opt.usage == "probability":
        if prob_sums is None:
            raise ValueError("usage='probability' needs prob_sums [L, E, G]")
        use = _np(prob_sums, "prob_sums")
        if use.shape != c.shape:
            raise ValueError(f"prob_sums must have the shape of counts {c.shape}; got {use.shape}")
    else:
        use = c
        if np.any(c > t[:, None, :]):
            l, e, g = np.argwhere(c > t[:, None, :])[0]
            raise ValueError(f"counts[{l}, {e}, {g}]={c[l, e, g]:g} exceeds tokens[{l}, {g}]={t[l, g]:g}")
    valid = np.ones((L, E), bool) if expert_mask is None else np.asarray(expert_mask, bool)
    if valid.shape != (L, E):
        raise ValueError(f"expert_mask must be [L, E] = [{L}, {E}]; got shape {valid.shape}")
    layer_ids = list(range(L)) if layers is None else [int(x) for x in layers]
    if len(layer_ids) != L:
        raise ValueError(f"layers must name {L} layers; got {len(layer_ids)}")

    ni = names.index(neutral)
    present = t.sum(axis=0) > 0
    demo = [g for g in range(G) if g != ni and present[g]]
    if not demo:
        raise ValueError(f"no demographic group with tokens among {names}; FSP compares groups to {neutral!r}")
    if np.any(t[:, ni] == 0):
        raise ValueError(f"neutral group {neutral!r} has no tokens at layer {layer_ids[int(np.argmin(t[:, ni]))]}")
    if np.any(t[:, demo] == 0):
        l, g = np.argwhere(t[:, demo] == 0)[0]
        raise ValueError(f"group {names[demo[g]]!r} has tokens at some layers but none at layer {layer_ids[l]}")

    p_eg = use / t[:, None, :]  # [L, E, G]
    p_n = p_eg[:, :, ni]  # [L, E]
    p_d = p_eg[:, :, demo]  # [L, E, Gd]
    td = t[:, demo]  # [L, Gd]

    # Eq. 1: ARD
    ard_g = np.abs(p_d - p_n[:, :, None])
    if opt.ard_aggregate == "mean":
        ard = ard_g.mean(axis=2)
    elif opt.ard_aggregate == "max":
        ard = ard_g.max(axis=2)
    else:
        ard = (ard_g * td[:, None, :]).sum(axis=2) / td.sum(axis=1)[:, None]

    # Eq. 2: JSD summands between demographic and neutral expert-usage distributions
    dist_n = _normalise_dist(use[:, :, ni])  # [L, E]
    dist_g = _normalise_dist(np.moveaxis(use[:, :, demo], 2, 1))  # [L, Gd, E]
    if opt.jsd_demographic == "pooled":
        dist_d = _normalise_dist(use[:, :, demo].sum(axis=2))
    else:
        dist_d = dist_g.mean(axis=1)
    jsd = jsd_terms(dist_d, dist_n)
    ent = entr(dist_d) - entr(dist_n)
    jsd_by_group = jsd_terms(dist_g, dist_n[:, None, :]).sum(axis=2)  # [L, Gd]
    jsd_by_axis = {}
    if group_axes:
        for axis in sorted({group_axes[names[g]] for g in demo if names[g] in group_axes}):
            members = [g for g in demo if group_axes.get(names[g]) == axis]
            jsd_by_axis[axis] = jsd_terms(_normalise_dist(use[:, :, members].sum(axis=2)), dist_n).sum(axis=1)

    # Eq. 3: PMI
    s = opt.pmi_smoothing
    if opt.pmi_baseline == "pooled":
        p_e = use.sum(axis=2) / t.sum(axis=1)[:, None]
    else:
        p_e = p_n
    denom = p_e[:, :, None]
    if opt.pmi_form == "printed":
        p_g = td / t.sum(axis=1, keepdims=True)
        denom = denom * p_g[:, None, :]
    pmi_g = np.log2((p_d + s) / (denom + s))
    if opt.pmi_aggregate == "max":
        pmi = pmi_g.max(axis=2)
    elif opt.pmi_aggregate == "mean":
        pmi = pmi_g.mean(axis=2)
    else:
        pick = np.abs(pmi_g).argmax(axis=2)
        pmi = np.take_along_axis(pmi_g, pick[:, :, None], axis=2)[:, :, 0]

    raw = {"ard": ard, "jsd": jsd, "pmi": pmi, "ent": ent}
    metrics: dict[str, np.ndarray] = {}
    phi = np.zeros((L, E))
    for name, m in raw.items():
        m = np.where(valid, m, 0.0)
        if opt.normalization == "minmax":
            hat = minmax(m, valid, opt.constant_fill)
        elif opt.normalization == "minmax_global":
            hat = minmax(m.reshape(1, -1), valid.reshape(1, -1), opt.constant_fill).reshape(L, E)
        else:
            hat = m
        metrics[name], metrics[f"{name}_hat"] = m, np.where(valid, hat, 0.0)
        phi += float(opt.weights.get(name, 0.0)) * metrics[f"{name}_hat"]
    phi = np.where(valid, phi, 0.0)
    check_finite_phi(phi, opt)

    src = {"all": list(range(G)), "neutral": [ni], "demographic": demo}[opt.frequency_source]
    freq = np.where(valid, _normalise_dist(np.where(valid, c[:, :, src].sum(axis=2), 0.0)), 0.0)
    metrics["frequency"] = freq
    metrics["p_neutral"] = p_n
    metrics["p_pooled"] = p_e if opt.pmi_baseline == "pooled" else use.sum(axis=2) / t.sum(axis=1)[:, None]

    share_src = phi if opt.top_share_of == "phi" else freq
    per_layer = []
    for li in range(L):
        ok = valid[li]
        per_layer.append({
            "layer": layer_ids[li],
            "gini": gini(freq[li, ok]),
            "top_share": top_share(share_src[li, ok], opt.top_share_k),
            "spearman_phi_f": spearman(phi[li, ok], freq[li, ok]),
            "jsd": float(jsd[li].sum()),
            "entropy_diff": float(ent[li].sum()),
        })
    model = {
        "n_slots": int(valid.sum()),
        "gini": gini(freq[valid]),
        "top_share": top_share(share_src[valid], opt.top_share_k),
        "spearman_phi_f": spearman(phi[valid], freq[valid]),
        "mean_layer_jsd": float(jsd.sum(axis=1).mean()),
    }
    return FSPResult(
        phi=torch.from_numpy(phi),
        metrics=metrics,
        layer={"jsd": jsd.sum(axis=1), "entropy_diff": ent.sum(axis=1), "jsd_by_group": jsd_by_group,
               "jsd_by_axis": jsd_by_axis},
        descriptors={"layers": per_layer, "model": model, "top_share_k": opt.top_share_k,
                     "top_share_of": opt.top_share_of},
        groups=[names[g] for g in demo],
        layers=layer_ids,
        options=opt.to_dict(),
    )
