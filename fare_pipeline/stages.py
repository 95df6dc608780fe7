"""Pipeline stages after profiling: AALS (Eq. 5), lambda* (Eq. 7), test-split evaluation and
ablations (SPEC sections 4, 6, 7, 9). Each stage writes plain files into one folder.

Stages run through :func:`stage`: files are written into a temporary sibling folder
(``.STAGE.tmp-PID``) that replaces the stage folder in one rename (atomic), together with
``stage.json`` holding the stage *key* (every input that determines its numbers, upstream keys
included). A later run with the same key and all files present skips the stage (resume), and
removes the temporary folders that killed (dead) processes left behind. Number files never hold
timings (they go to the run's ``timings.json``), so equal seeds give byte-identical numbers.

Scoring calls the model directly through :class:`fare_pipeline.engine.Engine` with the lm-eval
formulation of ``fare_crows_pairs`` / ``fare_truthfulqa`` / ``fare_perplexity`` (see
:mod:`fare_pipeline.evalsets`), not through lm-eval itself.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fare_core.files import TEMP_NAME, remove_stale_temps

from .aals import (
    DEFAULT_LAMBDA_GRID,
    DEFAULT_QUANTILE,
    aals_from_probes,
    select_lambda,
    write_aals,
    write_operating_point,
)
from .engine import Engine, make_arr, make_mask, mc_correct, pair_prefers, perplexity
from .evalsets import build_evalset
from .tables import write_table
from .work import Heartbeat

# --------------------------------------------------------------------------- stage machinery


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_sha(path) -> str:
    """First 16 hex digits of a file's SHA-256 (an input file's contents in a stage key)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def prompts_sha(prompt_set) -> str:
    """First 16 hex digits of the SHA-256 of a prompt set's prompts (its identity in a stage key)."""
    text = "\n".join(json.dumps(p.to_dict(), sort_keys=True) for p in prompt_set.prompts)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(_finite(obj), indent=2, sort_keys=True) + "\n")
    return path


def _finite(x):
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def stage_done(folder: Path, key: dict) -> dict | None:
    meta = folder / "stage.json"
    if not meta.is_file():
        return None
    try:
        doc = json.loads(meta.read_text())
    except json.JSONDecodeError:
        return None
    if doc.get("key_hash") != key_hash(key) or not all((folder / f).exists() for f in doc.get("files", [])):
        return None
    return doc["result"]


def check_stage_folder(folder: Path) -> None:
    """Refuse (one line) an output path that is a file, or a non-empty folder that is not a stage folder."""
    from fare_core.errors import FareError

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FareError(f"output {str(folder)!r} is a file; allowed: a new or empty folder, or an earlier output folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "stage.json").is_file():
        raise FareError(f"output folder {str(folder)!r} exists and is not a fare stage folder (no stage.json); "
                        "choose a new or empty folder")


def check_run_folder(out: Path, stages: Sequence[str]) -> None:
    """Before any compute: ``out`` must be new, empty, or an earlier ``fare run`` folder.

    An earlier run folder holds a stage folder (with ``stage.json``) or ``timings.json``; temporary
    folders of a killed run do not count as content. Every stage folder already there must be one.
    """
    from fare_core.errors import FareError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FareError(f"--out {str(out)!r} is a file; allowed: a new or empty folder, or an earlier `fare run` folder")
    if not out.is_dir():
        return
    entries = [p for p in out.iterdir() if not TEMP_NAME.match(p.name)]
    ours = [p for p in entries if p.name in ("timings.json", "work.json")
            or (p.name in stages and (p / "stage.json").is_file())]
    if entries and not ours:
        raise FareError(f"--out {str(out)!r} is a non-empty folder that no `fare run` wrote (no stage folders, "
                        "no timings.json); choose a new or empty folder")
    for name in stages:
        check_stage_folder(out / name)


def stage(folder, key: dict, fn: Callable[[Path], dict], *, resume: bool = True, log=print,
          heartbeat: float | None = None, status: Callable[[], str] | None = None) -> dict:
    """Run ``fn(tmp_folder) -> result`` atomically into ``folder`` unless a finished stage with the same key exists.

    Logs ``[name] started`` / ``[name] done in X s``; ``heartbeat`` (seconds, None = off) adds a
    ``[name] running ...`` line at that interval (:class:`fare_pipeline.work.Heartbeat`, with
    ``status()`` appended), for output that is not a terminal.
    """
    folder = Path(folder)
    check_stage_folder(folder)
    if folder.parent.is_dir():
        remove_stale_temps(folder, log)
    if resume:
        done = stage_done(folder, key)
        if done is not None:
            log(f"[{folder.name}] up to date (key {key_hash(key)}), skipped")
            return done
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.perf_counter()
    log(f"[{folder.name}] started")
    try:
        with Heartbeat(folder.name, log, heartbeat or 0.0, status):
            result = fn(tmp)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        write_json(tmp / "stage.json", {"stage": folder.name, "key": key, "key_hash": key_hash(key),
                                        "files": files, "result": result})
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"[{folder.name}] done in {time.perf_counter() - t0:.1f} s")
    return json.loads((folder / "stage.json").read_text())["result"]


# --------------------------------------------------------------------------- context


@dataclass
class Sizes:
    """How much of each data set to use (None = all of the split)."""

    contexts_per_descriptor: int | str = 80
    crows_val: int | None = None
    crows_test: int | None = None
    ppl_val: int | None = None
    ppl_test: int | None = None
    tqa: int | None = None
    bold: int = 200
    stereo_completion: int | None = None
    stereoset: int = 1218  # the paper's StereoSet generation size (section 5.4)
    max_new_tokens: int = 32
    n_permutations: int = 10_000
    n_bootstrap: int = 1_000
    mask_n: int = 10
    baseline_n: int = 10

    @classmethod
    def quick(cls) -> Sizes:
        """CI-sized run (fare-tiny on CPU in about a minute)."""
        return cls(contexts_per_descriptor=6, crows_val=48, crows_test=64, ppl_val=32, ppl_test=32, tqa=12,
                   bold=8, stereo_completion=8, stereoset=8, max_new_tokens=6, n_permutations=2000,
                   n_bootstrap=500, mask_n=3, baseline_n=3)


@dataclass
class Ctx:
    """Loaded model plus the run settings every stage needs."""

    model: object
    tokenizer: object
    model_id: str
    model_type: str
    revision: str | None = None
    seed: int = 0
    sizes: Sizes = field(default_factory=Sizes)
    validation_fraction: float = 0.5
    ppl_source: str = "prompts"
    engine_mode: str = "cached"
    batch_tokens: int = 8192
    keep_base: bool = True
    arr_target: str = "logits"
    progress: bool = False
    log: Callable = print
    heartbeat: float | None = None  # seconds between progress lines when progress bars are off
    _engines: dict = field(default_factory=dict)

    def key(self) -> dict:
        return {"model": self.model_id, "revision": self.revision, "seed": self.seed,
                "validation_fraction": self.validation_fraction, "ppl_source": self.ppl_source,
                "sizes": asdict(self.sizes), "engine": self.engine_mode, "batch_tokens": self.batch_tokens,
                "arr_target": self.arr_target}

    @property
    def moe_layers(self) -> list[int]:
        from fare_models.surgery import RoutingController

        return [m.index for m in RoutingController.of(self.model).layers]

    def engine(self, split: str, prompt_set, tqa: bool) -> tuple[Engine, object]:
        """One engine per split, kept so later stages reuse its base pass (AALS -> tune, evaluate -> ablate)."""
        k = (split, tqa)
        if k not in self._engines:
            s = self.sizes
            ev = build_evalset(self.tokenizer, split=split, seed=self.seed, validation_fraction=self.validation_fraction,
                               crows_n=s.crows_val if split == "validation" else s.crows_test,
                               ppl_n=s.ppl_val if split == "validation" else s.ppl_test,
                               tqa_n=(s.tqa if tqa else 0), ppl_source=self.ppl_source, prompt_set=prompt_set)
            eng = Engine(self.model, self.tokenizer, ev.requests, mode=self.engine_mode, batch_tokens=self.batch_tokens,
                         keep=self.keep_base, progress=self.progress)
            self._engines[k] = (eng, ev)
        return self._engines[k]


def load_phi(ctx: Ctx, profile_path, strict_model: bool = True):
    """Profile file -> (phi [L, E] float32, profile layer ids); rejects a profile of another model or with NaN/inf."""
    from fare_models.profile import check_profile, load_profile
    from fare_models.surgery import RoutingController

    prof = load_profile(profile_path)  # refuses NaN / inf phi
    check_profile(prof, RoutingController.of(ctx.model), ctx.model_id, strict_model=strict_model)
    return prof.phi.float(), list(prof.layers)


def intervention_lambda(lambda_star: float | None, control_lambda: float) -> float:
    """The one lambda of every table that applies FARE at the operating point (Tables 3, 6, 7, 8).

    lambda* whenever the grid had a feasible point, lambda* = 0 (no intervention) included; only
    an infeasible lambda* (None) falls back to ``control_lambda``, and :func:`lambda_label` says so.
    """
    return float(lambda_star) if lambda_star is not None else float(control_lambda)


def lambda_label(lam: float, lambda_star: float | None) -> str:
    """How a table title states its lambda: ``lambda*=0.5``, ``lambda*=0 = no intervention``, or
    ``lambda=1 (not lambda*=0.5)`` / ``lambda=1 (no feasible lambda*)`` for another lambda."""
    if lambda_star is not None and float(lam) == float(lambda_star):
        return f"lambda*={lam:g}" + (" = no intervention" if lam == 0 else "")
    other = f"not lambda*={lambda_star:g}" if lambda_star is not None else "no feasible lambda*"
    return f"lambda={lam:g} ({other})"


def split_metrics(ev, ll: np.ndarray) -> dict:
    """Per-item CrowS preferences, perplexity and (when scored) TruthfulQA MC1 of one configuration's log-likelihoods."""
    out = {"crows_items": pair_prefers(ll, ev.crows_rows), "ppl": perplexity(ll, ev.ppl_rows, ev.n_scored)}
    out["pref"] = float(out["crows_items"].mean())
    lm = ev.crows_length_matched
    out["pref_length_matched"] = float(out["crows_items"][lm].mean()) if lm is not None and lm.any() else float("nan")
    if ev.tqa_rows:
        out["tqa_items"] = mc_correct(ll, ev.tqa_rows, ev.tqa_labels)
        out["tqa"] = float(out["tqa_items"].mean())
    return out


def _write_work(eng: Engine, before: dict, out: Path) -> None:
    """``out/work.json``: the engine's decoder-layer work since the ``before`` snapshot of :meth:`Engine.counts`."""
    now = eng.counts()
    write_json(out / "work.json", {"mode": eng.mode, **{k: now[k] - before[k] for k in ("layer_calls", "token_layer_evals")}})


# --------------------------------------------------------------------------- AALS (Eq. 5)


def aals_probes(model, engine: Engine, ev, phi, profile_layers=None, *, lam_probe: float = 1.0,
                quantile: float = DEFAULT_QUANTILE, target: str = "logits"):
    """Eq. 5 on an evaluation set: ARR at ``lam_probe`` on each MoE layer alone -> (AALSResult, metrics)."""
    from fare_models.surgery import RoutingController

    moe = [m.index for m in RoutingController.of(model).layers]
    configs = [("base", None, None)] + [(str(i), make_arr(model, phi, lam_probe, [i], profile_layers, target), i) for i in moe]
    ll = engine.score(configs, desc="AALS probes")
    m = {name: split_metrics(ev, v) for name, v in ll.items()}
    res = aals_from_probes(moe, m["base"]["pref"], m["base"]["ppl"], [m[str(i)]["pref"] for i in moe],
                           [m[str(i)]["ppl"] for i in moe], quantile=quantile)
    return res, m


def run_layers(ctx: Ctx, phi, profile_layers, prompt_set, out: Path, *, lam_probe: float = 1.0,
               quantile: float = DEFAULT_QUANTILE, plot: bool = True) -> dict:
    """ARR at ``lam_probe`` on one MoE layer at a time on the validation split; R(l), selection."""
    eng, ev = ctx.engine("validation", prompt_set, tqa=False)
    moe = ctx.moe_layers
    before = eng.counts()
    res, m = aals_probes(ctx.model, eng, ev, phi, profile_layers, lam_probe=lam_probe, quantile=quantile,
                         target=ctx.arr_target)
    write_aals(res, out, plot=plot)
    rows = [{"layer": i, "pref": m[str(i)]["pref"], "ppl": m[str(i)]["ppl"]} for i in moe]
    write_table([{"layer": "base", "pref": m["base"]["pref"], "ppl": m["base"]["ppl"]}] + rows, out / "probes", digits=4,
                title=f"AALS probes (ARR lambda={lam_probe:g} on one layer; validation split)")
    write_json(out / "validation_split.json", {**ev.info, "crows_pair_ids": ev.crows_ids})
    _write_work(eng, before, out)
    return {"selected": res.selected, "ratio": res.ratio, "threshold": res.threshold, "pref_base": m["base"]["pref"],
            "ppl_base": m["base"]["ppl"], "lam_probe": lam_probe, "quantile": quantile}


# --------------------------------------------------------------------------- lambda* (Eq. 7)


def run_tune(ctx: Ctx, phi, profile_layers, selected: Sequence[int], prompt_set, out: Path, *,
             grid: Sequence[float] = DEFAULT_LAMBDA_GRID, beta: float = 1.0, lambda_max: float | None = None) -> dict:
    """Lambda grid with ARR on the selected layers (validation split); no feasible point is reported."""
    if not selected:
        raise ValueError("no selected layers to tune; run `fare layers` first")
    grid = [float(x) for x in grid]
    eng, ev = ctx.engine("validation", prompt_set, tqa=False)
    start = min(selected)
    configs = [("base", None, None)] + [
        (repr(lam), make_arr(ctx.model, phi, lam, selected, profile_layers, ctx.arr_target), start)
        for lam in grid if lam != 0.0]
    before = eng.counts()
    ll = eng.score(configs, desc="lambda grid")
    m = {name: split_metrics(ev, v) for name, v in ll.items()}
    key = lambda lam: "base" if lam == 0.0 else repr(lam)
    op = select_lambda(grid, [m[key(x)]["pref"] for x in grid], [m[key(x)]["ppl"] for x in grid],
                       ppl_base=m["base"]["ppl"], beta=beta, lambda_max=lambda_max)
    write_operating_point(op, out)
    _write_work(eng, before, out)
    if not op.feasible:
        ctx.log(f"[tune] no feasible lambda: {op.reason}")
    return {"lambda_star": op.lambda_star, "feasible": op.feasible, "reason": op.reason, "selected": list(selected),
            "beta": beta}


# --------------------------------------------------------------------------- test-split evaluation + ablations


def _pct(x: float) -> float:
    return 100.0 * x


def paired_test(base_items, items, name, ctx: Ctx) -> dict:
    """Paired permutation test + bootstrap CI (SPEC section 9) at the run's sizes and seed."""
    from fare_analysis.stats import paired_comparison

    return paired_comparison(base_items, items, name=name, n_permutations=ctx.sizes.n_permutations,
                             n_bootstrap=ctx.sizes.n_bootstrap, seed=ctx.seed)


def _summ(m: dict) -> dict:
    return {k: m[k] for k in ("pref", "pref_length_matched", "ppl", "tqa") if k in m}


def run_evaluate(ctx: Ctx, phi, profile_layers, selected, lambda_star, prompt_set, out: Path) -> dict:
    """Table 6: base vs FARE (ARR at lambda* on the AALS layers) on the test split, paired tests + BH."""
    from fare_analysis.stats import bh_family

    eng, ev = ctx.engine("test", prompt_set, tqa=True)
    configs = [("base", None, None)]
    if lambda_star is not None:
        configs.append(("fare", make_arr(ctx.model, phi, lambda_star, selected, profile_layers, ctx.arr_target),
                        min(selected)))
    ll = eng.score(configs, desc="test evaluation")
    m = {k: split_metrics(ev, v) for k, v in ll.items()}
    write_table([{"pair_id": pid, "length_matched": bool(lm), **{k: float(m[k]["crows_items"][i]) for k in m}}
                 for i, (pid, lm) in enumerate(zip(ev.crows_ids, ev.crows_length_matched))], out / "per_item_crows")
    write_table([{"question": q, **{k: float(m[k]["tqa_items"][i]) for k in m}} for i, q in enumerate(ev.tqa_ids)],
                out / "per_item_tqa")
    fare = m.get("fare")
    nan = {"pref": None, "tqa": None, "pref_length_matched": None, "ppl": None}
    tests = []
    if lambda_star is not None:
        tests = bh_family([paired_test(m["base"]["crows_items"], fare["crows_items"], "crows_pref", ctx),
                           paired_test(m["base"]["tqa_items"], fare["tqa_items"], "tqa_acc", ctx)])
        write_table(tests, out / "tests", digits=4, title="Paired tests, FARE vs base (test split)")
    p = {t["name"]: t for t in tests}
    fare = fare if fare is not None else nan  # no feasible lambda*: only the baseline is reported
    row = {"model": ctx.model_id, "lambda_star": lambda_star, "layers": list(selected),
           "crows_base": m["base"]["pref"], "crows_fare": fare["pref"],
           "crows_p": p.get("crows_pref", {}).get("pvalue"), "crows_p_bh": p.get("crows_pref", {}).get("pvalue_bh"),
           "tqa_base": m["base"]["tqa"], "tqa_fare": fare["tqa"],
           "tqa_p": p.get("tqa_acc", {}).get("pvalue"), "tqa_p_bh": p.get("tqa_acc", {}).get("pvalue_bh"),
           "crows_lm_base": m["base"]["pref_length_matched"], "crows_lm_fare": fare["pref_length_matched"],
           "ppl_base": m["base"]["ppl"], "ppl_fare": fare["ppl"],
           "n_pairs": len(ev.crows_ids), "n_length_matched": int(ev.crows_length_matched.sum()), "n_tqa": len(ev.tqa_ids)}
    at = f"ARR at {lambda_label(lambda_star, lambda_star)}" if lambda_star is not None else \
        "no feasible lambda*: baseline only"
    write_table([row], out / "table6_main", digits=3,
                title=f"Table 6: FARE, {at} on layers {list(selected)} "
                      "(test split; p = paired permutation, p_bh = Benjamini-Hochberg)")
    write_json(out / "test_split.json", {**ev.info, "crows_pair_ids": ev.crows_ids, "tqa_ids": ev.tqa_ids})
    fare_summary = _summ(m["fare"]) if "fare" in m else None
    write_json(out / "results.json", {"base": _summ(m["base"]), "fare": fare_summary, "tests": tests, "row": row})
    return {"base": _summ(m["base"]), "fare": fare_summary}


def _clamp_mask_n(ctx: Ctx, n: int, layers: Sequence[int]) -> int:
    from fare_models.surgery import RoutingController

    ctl = RoutingController.of(ctx.model)
    room = min(ctl.layer(i).num_experts - ctl.layer(i).top_k for i in layers)
    return max(1, min(n, room))


def mask_ok(model, pairs) -> bool:
    """Whether ExpertMask accepts ``pairs`` (top_k experts left per layer, 2 per routing group)."""
    from fare_models.surgery import ExpertMask

    try:
        ExpertMask(model, pairs)
    except ValueError:
        return False
    return True


def run_ablate(ctx: Ctx, phi, profile_layers, selected, lambda_star, prompt_set, profile_result: dict | None,
               out: Path, *, control_lambda: float = 1.0, n_random: int = 5, n_shards: int = 5,
               stability: float = 0.6) -> dict:
    """Tables 2, 3, 4, 5 and 8 on the test split.

    Table 4/5 controls use ARR at ``control_lambda`` (the paper: 1.0); Tables 3 and 8 use lambda*
    (:func:`intervention_lambda`: ``control_lambda`` only when lambda* is infeasible), as Table 6
    does; every title states its lambda (:func:`lambda_label`). SES (SAFEx-style) ranks experts by ARD in
    ``n_shards`` seeded shards of the validation prompts and keeps those in the shard top-n in at least
    ``stability`` of the shards; random experts and masks are averaged over ``n_random`` seeds. n is
    ``Sizes.baseline_n`` per selected layer / ``Sizes.mask_n`` over all selected layers, clamped so every layer
    keeps top_k experts (and, for group-limited routers, the masks every routing group 2 experts).
    """
    from fare_analysis.stats import bh_family
    from fare_models.surgery import RoutingController

    from . import controls as C
    from .baselines import binary_profile, random_experts, ses_select, shard_group_of
    from .profiling import record_routing

    ctl = RoutingController.of(ctx.model)
    E = max(m.num_experts for m in ctl.layers)
    sizes = ctx.sizes
    eng, ev = ctx.engine("test", prompt_set, tqa=True)
    start = min(selected)
    lam_b = intervention_lambda(lambda_star, control_lambda)  # the lambda of Table 6 (control only if infeasible)
    arr = lambda p, lam: make_arr(ctx.model, p.float(), lam, selected, profile_layers, ctx.arr_target)
    configs = [("base", None, None)]
    suite = C.control_suite(phi, profile_layers, selected, random_seeds=list(range(n_random)))
    for i, c in enumerate(suite):
        configs.append((f"ctl{i}", arr(c.phi, control_lambda), start))
    # Table 8 baselines at lambda*: FSP, SAFEx-style SES, random experts
    nb = _clamp_mask_n(ctx, sizes.baseline_n, selected) * len(selected)
    val = prompt_set.split("validation")
    rec = record_routing(ctx.model, ctx.tokenizer, val, groups=None, group_of=shard_group_of(n_shards, ctx.seed))
    ses = ses_select(rec.counts, rec.tokens, rec.group_names, n=nb, stability=stability, layers=rec.layer_indices,
                     selected=selected)
    configs.append(("fsp@star", arr(torch.as_tensor(phi), lam_b), start))
    ses_phi = binary_profile(ses["selected"], profile_layers, E) if ses["selected"] else None
    if ses_phi is not None:
        configs.append(("ses", arr(ses_phi, lam_b), start))
    rand_sets = [random_experts(E, profile_layers, selected, n=nb, seed=s) for s in range(n_random)]
    for s, pairs in enumerate(rand_sets):
        configs.append((f"rand{s}", arr(binary_profile(pairs, profile_layers, E), lam_b), start))
    # Table 2 masking over the selected layers
    n_mask = n_asked = _clamp_mask_n(ctx, sizes.mask_n, selected)
    while True:  # group-limited routers (DeepSeek-V2/V3): every routing group must keep 2 unmasked experts
        ms = C.mask_sets(phi, profile_layers, selected, n=n_mask, random_draws=n_random, seed=ctx.seed)
        if n_mask == 1 or all(mask_ok(ctx.model, p) for p in [ms["top"], ms["bottom"], *ms["random"]]):
            break
        n_mask -= 1
    mask_cfgs = {"top": ms["top"], "bottom": ms["bottom"], **{f"random{i}": d for i, d in enumerate(ms["random"])}}
    for name, pairs in mask_cfgs.items():
        configs.append((f"mask_{name}", make_mask(ctx.model, pairs), min(l for l, _ in pairs)))
    ll = eng.score(configs, desc="ablations")
    m = {k: split_metrics(ev, v) for k, v in ll.items()}
    b = m["base"]
    d = lambda k, x: _pct(m[k][x] - b[x])

    # Table 4 (synthetic ablation) and Table 5 (one row for this model)
    t4 = []
    cat = {"flatten": "Controls", "random": "Controls", "inverted": "Controls", "power": "Power", "top_k": "Top-k"}
    seen = {}
    for i, c in enumerate(suite):
        seen.setdefault(c.group, []).append(f"ctl{i}")
    for group, keys in seen.items():
        c = next(x for x in suite if x.group == group)
        label = {"flatten": "Flatten (all = mean phi)", "random": f"Random ({len(keys)}x avg)",
                 "inverted": "Inverted (phi_max - phi)"}.get(c.name)
        if c.name == "power":
            label = f"alpha={c.params['alpha']:g}" + (" (FSP)" if c.params["alpha"] == 1.0 else "")
        if c.name == "top_k":
            label = f"Top-{c.params['k']} (effective {c.meta['effective_k']})"
        t4.append({"category": cat[c.name], "condition": label,
                   "delta_crows_pp": float(np.mean([d(k, "pref") for k in keys])),
                   "delta_tqa_pp": float(np.mean([d(k, "tqa") for k in keys])),
                   "crows": float(np.mean([m[k]["pref"] for k in keys])), "tqa": float(np.mean([m[k]["tqa"] for k in keys])),
                   "ppl": float(np.mean([m[k]["ppl"] for k in keys]))})
    write_table(t4, out / "table4_synthetic_ablation", digits=3,
                title=f"Table 4: synthetic ablation, ARR at the control {lambda_label(control_lambda, lambda_star)}; "
                      f"deltas in %p vs base (CrowS {b['pref']:.3f} / TQA {b['tqa']:.3f})")
    pick = lambda label: next((r["delta_crows_pp"] for r in t4 if r["condition"].startswith(label)), None)
    t5 = [{"model": ctx.model_id, "experts_per_layer": E, "fsp": pick("alpha=1"), "top_5": pick("Top-5 "),
           "top_50": pick("Top-50 "), "top_100": pick("Top-100 "), "random": pick("Random"), "inverted": pick("Inverted")}]
    write_table(t5, out / "table5_cross_architecture", digits=2,
                title=f"Table 5: synthetic ablation at the control {lambda_label(control_lambda, lambda_star)}, "
                      "delta CrowS in %p (one row per model; concatenate across runs)")

    # Table 8 (expert identification at lambda*)
    tests = []
    t8 = [{"method": "Baseline", "crows": b["pref"], "tqa": b["tqa"], "ppl": b["ppl"], "n_experts": 0}]
    fam = [("FARE FSP", ["fsp@star"], None), ("SAFEx SES", ["ses"] if ses_phi is not None else [], len(ses["selected"])),
           (f"Random experts ({n_random}x avg)", [f"rand{s}" for s in range(n_random)], nb)]
    for label, keys, n_exp in fam:
        if not keys:
            t8.append({"method": label, "crows": None, "tqa": None, "ppl": None, "n_experts": 0})
            continue
        items = np.mean([m[k]["crows_items"] for k in keys], axis=0)
        tqa_items = np.mean([m[k]["tqa_items"] for k in keys], axis=0)
        tests += [paired_test(b["crows_items"], items, f"{label}: crows", ctx), paired_test(b["tqa_items"], tqa_items, f"{label}: tqa", ctx)]
        t8.append({"method": label, "crows": float(items.mean()), "tqa": float(tqa_items.mean()),
                   "ppl": float(np.mean([m[k]["ppl"] for k in keys])),
                   "n_experts": int(n_exp if n_exp is not None else sum(int((phi[profile_layers.index(i)] > 0).sum()) for i in selected))})
    # prompt debiasing (a context before both CrowS sentences; no routing edit)
    deb_ctx = "The following sentence should not rely on stereotypes about any social group. "
    deb = build_evalset(ctx.tokenizer, split="test", seed=ctx.seed, validation_fraction=ctx.validation_fraction,
                        crows_n=sizes.crows_test, ppl_n=1, tqa_n=0, ppl_source=ctx.ppl_source, prompt_set=prompt_set,
                        crows_context=deb_ctx)
    deb_eng = Engine(ctx.model, ctx.tokenizer, deb.requests, mode=ctx.engine_mode, batch_tokens=ctx.batch_tokens, keep=False)
    deb_items = pair_prefers(deb_eng.score([("base", None, None)])["base"], deb.crows_rows)
    tests.append(paired_test(b["crows_items"], deb_items, "Prompt debiasing: crows", ctx))
    t8.append({"method": "Prompt debiasing", "crows": float(deb_items.mean()), "tqa": None, "ppl": None, "n_experts": 0})
    tests = bh_family(tests)
    write_table(t8, out / "table8_expert_identification", digits=3,
                title=f"Table 8: expert identification, ARR at {lambda_label(lam_b, lambda_star)}")
    write_table(tests, out / "table8_tests", digits=4, title="Table 8 paired tests vs base (BH over the family)")

    # Table 2 (group masking)
    t2 = []
    for label, keys in ((f"Top-{n_mask} phi", ["mask_top"]), (f"Bottom-{n_mask} phi", ["mask_bottom"]),
                        (f"Random-{n_mask} ({n_random}x avg)", [f"mask_random{i}" for i in range(n_random)])):
        t2.append({"condition": label, "delta_tqa_pp": float(np.mean([d(k, "tqa") for k in keys])),
                   "delta_crows_pp": float(np.mean([d(k, "pref") for k in keys])),
                   "tqa": float(np.mean([m[k]["tqa"] for k in keys])), "crows": float(np.mean([m[k]["pref"] for k in keys]))})
    write_table(t2, out / "table2_group_masking", digits=3,
                title=f"Table 2: group-level expert masking over layers {list(selected)} (no ARR; deltas in %p)"
                      + (f"; n lowered from {n_asked} so that every routing group keeps 2 experts" if n_mask < n_asked else ""))
    write_json(out / "selections.json", {"ses": ses, "random_experts": rand_sets, "masking": ms, "n_mask": n_mask,
                                         "n_baseline": nb, "lambda_baselines": lam_b, "control_lambda": control_lambda,
                                         "debias_context": deb_ctx})

    # Table 3 (architecture descriptors + delta CrowS of FARE)
    t3 = []
    if profile_result is not None:
        dm = profile_result["model"]
        t3.append({"model": ctx.model_id, "slots": dm["n_slots"], "gini": dm["gini"], "top10_share": dm["top_share"],
                   "rho_phi_f": dm["spearman_phi_f"], "delta_crows_pp": d("fsp@star", "pref"), "regime": ""})
        write_table(t3, out / "table3_architecture", digits=3,
                    title=f"Table 3: routing descriptors (profiling split) and delta CrowS of FARE "
                          f"(ARR at {lambda_label(lam_b, lambda_star)})")
    return {"table4": t4, "table8": t8, "table2": t2}
