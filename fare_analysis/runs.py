"""One evaluated run, read from its own records: identity, evaluation settings and per-item samples.

:func:`load_run` accepts

* an lm-eval ``--output_path`` folder (or its ``<model>/`` sub-folder) written with ``--log_samples``:
  ``results_<timestamp>.json`` (configs, settings, ``config.fare_moe`` model info) and
  ``samples_<task>_<timestamp>.jsonl`` per task;
* a ``fare run`` folder (``report/manifest.json``; no lm-eval samples).

The identity (model, revision, compression method and parameters, safety proportion p,
intervention, lambda) comes from ``config.model_args`` / ``config.fare_moe``, the
``fare_compression.json`` manifest of the checkpoint folder the model arguments point at, or the
``fare run`` manifest - never from folder names. :func:`iter_samples` streams one task's items, so
many runs can be analysed without holding them in memory.
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fare_core.errors import FareError

COMPRESSION_MANIFEST = "fare_compression.json"  # fare_compression.checkpoint.MANIFEST (read as a file, no import)
FARE_RUN_MANIFEST = Path("report") / "manifest.json"
#: settings that change the numbers of a run; differences are reported by compare/drift.
EVAL_KEYS = ("batch_size", "dtype", "max_length", "chat_template", "system_instruction", "fewshot_as_multiturn",
             "fewshot", "limit", "judge", "gen_kwargs", "task_versions")


@dataclass
class Run:
    """A run folder: ``identity`` (who was evaluated), ``tasks`` (samples file per task),
    ``task_configs`` (lm-eval task configs as logged), ``eval_config`` (settings that change numbers),
    ``results`` (lm-eval's reported aggregates per task)."""

    path: Path
    kind: str  # "lm-eval" | "fare-run"
    identity: dict
    tasks: dict[str, Path] = field(default_factory=dict)
    task_configs: dict[str, dict] = field(default_factory=dict)
    eval_config: dict = field(default_factory=dict)
    results: dict[str, dict] = field(default_factory=dict)
    results_files: list[Path] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.identity["label"]


# ----------------------------------------------------------------------------------- identity


def canonical_model(name) -> str | None:
    """``fare-tiny`` and ``fare-tiny:olmoe`` are one model; other ids pass through."""
    if not isinstance(name, str) or not name:
        return None
    from fare_core.tiny import is_tiny_spec, parse_tiny_spec

    if is_tiny_spec(name):
        try:
            return f"fare-tiny:{parse_tiny_spec(name)}"
        except ValueError:
            return name
    return name


def parse_model_args(model_args) -> dict:
    """``config.model_args`` as lm-eval logs it: a dict, or the ``k=v,k=v`` string (or JSON)."""
    if isinstance(model_args, dict):
        return dict(model_args)
    if not model_args:
        return {}
    text = str(model_args).strip()
    if text.startswith("{"):
        try:
            return dict(json.loads(text))
        except (json.JSONDecodeError, TypeError, ValueError):
            pass
    from lm_eval.utils import simple_parse_args_string

    return simple_parse_args_string(text)


def _number(value):
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def make_label(identity: dict) -> str:
    """Short human label built from the identity fields (never from a folder name)."""
    parts = [identity.get("model") or "?"]
    if identity.get("method") not in (None, "none"):
        params = identity.get("method_params") or {}
        shown = ",".join(f"{k}={v}" for k, v in sorted(params.items())
                         if not str(k).startswith("calib_") and k not in ("p",))
        parts.append(identity["method"] + (f"[{shown}]" if shown else ""))
        if identity.get("p") is not None:
            parts.append(f"p={identity['p']:g}")
    if identity.get("intervention") not in (None, "none"):
        lam = identity.get("lam")
        parts.append(identity["intervention"] + (f" lam={lam:g}" if isinstance(lam, (int, float)) else ""))
    if identity.get("revision") not in (None, "", "main"):
        parts.append(f"@{identity['revision']}")
    return " ".join(parts)


def checkpoint_dir(pretrained, run_folder: Path | None = None) -> Path | None:
    """The compressed-checkpoint folder ``pretrained`` names (one holding a fare_compression.json), or None.

    A relative path is tried from the working directory first, then from the run folder and each of
    its parents, so a run recorded as ``sweep/checkpoints/...`` is found from any working directory.
    """
    if not isinstance(pretrained, str) or not pretrained:
        return None
    path = Path(pretrained).expanduser()
    bases = [Path.cwd()]
    if run_folder is not None and not path.is_absolute():
        here = Path(run_folder).resolve()
        bases += [here, *here.parents]
    for base in bases:
        candidate = path if path.is_absolute() else base / path
        if (candidate / COMPRESSION_MANIFEST).is_file():
            return candidate
    return None


def lm_eval_identity(results: dict, run_folder: Path | None = None) -> dict:
    """Identity of an lm-eval run from its results_*.json (and a compressed checkpoint's manifest)."""
    config = results.get("config") or {}
    args = parse_model_args(config.get("model_args"))
    fare = config.get("fare_moe") or {}
    pretrained = args.get("pretrained")
    model = fare.get("model_id") or pretrained or results.get("model_name")
    revision = args.get("revision") or config.get("model_revision")
    method, params, p, source = "none", {}, None, None
    manifest = None
    ckpt = checkpoint_dir(pretrained, run_folder)
    if ckpt is not None:
        source = str(ckpt / COMPRESSION_MANIFEST)
        try:
            manifest = json.loads((ckpt / COMPRESSION_MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise FareError(f"{source}: unreadable compression manifest ({e}); re-run fare compress") from None
    if manifest:
        model = manifest.get("base_model") or model
        method = manifest.get("method") or "unknown"
        params = dict(manifest.get("params") or {})
        p = _number((manifest.get("calibration") or {}).get("p"))
        revision = manifest.get("base_revision") or revision
    elif fare.get("compression") or args.get("compression"):
        method = fare.get("compression") or args.get("compression")
        params = {k[len("compression_"):]: v for k, v in args.items() if k.startswith("compression_")}
        source = "config.model_args"
    if p is None and "calib_p" in params:
        p = _number(params["calib_p"])
    intervention = fare.get("intervention") or args.get("intervention") or "none"
    lam = _number(fare.get("lam", args.get("lam"))) if intervention == "arr" else None
    identity = {
        "model": canonical_model(model), "revision": revision if revision not in ("", None) else None,
        "method": method, "method_params": params, "p": p, "intervention": intervention, "lam": lam,
        "layers": fare.get("layers") if intervention == "arr" else None,
        "mask": fare.get("mask") if intervention == "mask" else None,
        "model_args": args, "method_source": source,
    }
    identity["label"] = make_label(identity)
    return identity


def fare_run_identity(manifest: dict) -> dict:
    """Identity of a ``fare run`` folder: the model with ARR at lambda* on the AALS layers."""
    identity = {
        "model": canonical_model(manifest.get("model")), "revision": manifest.get("revision"),
        "method": "none", "method_params": {}, "p": None, "intervention": "arr",
        "lam": _number(manifest.get("lambda_star")), "layers": manifest.get("selected_layers"), "mask": None,
        "model_args": {}, "method_source": None,
    }
    identity["label"] = make_label(identity)
    return identity


# ----------------------------------------------------------------------------------- folders


def _task_of(samples_path: Path) -> str:
    return samples_path.name[len("samples_"):].rsplit("_", 1)[0]


def _read_json(path: Path, folder: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FareError(f"{folder}: cannot read {path.name} ({type(e).__name__}: {e}); "
                        "re-run lm_eval with --output_path to rewrite it") from None
    if not isinstance(obj, dict):
        raise FareError(f"{folder}: {path.name} is not an lm-eval results object; re-run lm_eval --output_path")
    return obj


def _first_record(path: Path) -> dict | None:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    return None
    return None


def logged_verdict(filtered) -> dict:
    """The judge/scorer dict of a generation item's ``filtered_resps`` (lm-eval logs it as its repr), else {}."""
    if isinstance(filtered, list) and filtered:
        filtered = filtered[0]
    if isinstance(filtered, str) and filtered.startswith("{"):
        try:
            filtered = ast.literal_eval(filtered)
        except (ValueError, SyntaxError):
            return {}
    return filtered if isinstance(filtered, dict) else {}


def _judge_of(path: Path) -> str | None:
    """Refusal judge / toxicity scorer named in the first item's filtered response (generation tasks)."""
    rec = _first_record(path)
    verdict = logged_verdict(rec.get("filtered_resps")) if rec else {}
    return verdict.get("judge") or verdict.get("scorer")


def eval_settings(results: dict, tasks: dict[str, Path]) -> dict:
    """The settings of an lm-eval run that change its numbers (see :data:`EVAL_KEYS`)."""
    config = results.get("config") or {}
    judges = {t: j for t, p in sorted(tasks.items()) if (j := _judge_of(p)) is not None}
    return {
        "batch_size": config.get("batch_size"),
        "dtype": config.get("model_dtype") or parse_model_args(config.get("model_args")).get("dtype"),
        "max_length": results.get("max_length"),
        "chat_template": results.get("chat_template_sha") or (results.get("chat_template") and "custom"),
        "system_instruction": results.get("system_instruction_sha"),
        "fewshot_as_multiturn": results.get("fewshot_as_multiturn"),
        "fewshot": dict(sorted((results.get("n-shot") or {}).items())),
        "limit": config.get("limit"),
        "judge": judges,
        "gen_kwargs": config.get("gen_kwargs") or {},
        "task_versions": dict(sorted((results.get("versions") or {}).items())),
    }


IDENTITY_KEYS = ("model", "revision", "method", "method_params", "p", "intervention", "lam", "layers", "mask")
PER_TASK_KEYS = ("fewshot", "judge", "task_versions")


def _merge_settings(per_file: list[tuple[list[str], dict]]) -> dict:
    """Settings of several results files of one folder: per-task keys merged; a scalar setting that
    differs between files becomes ``{task: value}``."""
    out: dict = {}
    for key in EVAL_KEYS:
        if key in PER_TASK_KEYS:
            out[key] = dict(sorted({t: v for _, s in per_file for t, v in (s.get(key) or {}).items()}.items()))
            continue
        by_task = {t: s.get(key) for tasks, s in per_file for t in tasks}
        distinct = {json.dumps(v, sort_keys=True, default=str) for _, s in per_file for v in [s.get(key)]}
        out[key] = per_file[-1][1].get(key) if len(distinct) <= 1 else dict(sorted(by_task.items()))
    return out


def _load_lm_eval(folder: Path, results_paths: list[Path]) -> Run:
    results_paths = sorted(results_paths, key=lambda p: p.name)  # timestamp suffix: oldest first
    samples: dict[str, Path] = {}
    for path in sorted(folder.rglob("samples_*.jsonl"), key=lambda p: p.name):
        samples[_task_of(path)] = path  # newest timestamp wins
    if not samples:
        raise FareError(f"{folder}: results without samples_*.jsonl files; re-run lm_eval with --log_samples "
                        "(and the same --output_path) to log per-item values")
    for task, path in samples.items():
        if path.stat().st_size == 0:
            raise FareError(f"{folder}: {path.name} is empty; re-run lm_eval --log_samples for task {task}")
    identities: dict[str, Path] = {}
    merged: dict = {"configs": {}, "results": {}}
    per_file = []
    for path in results_paths:
        obj = _read_json(path, folder)
        ident = lm_eval_identity(obj, folder)
        identities.setdefault(json.dumps({k: ident[k] for k in IDENTITY_KEYS}, sort_keys=True, default=str), path)
        tasks = sorted(obj.get("configs") or {})
        per_file.append((tasks, eval_settings(obj, {t: samples[t] for t in tasks if t in samples})))
        for key in ("configs", "results"):
            merged[key].update(obj.get(key) or {})
        merged.update({k: v for k, v in obj.items() if k not in ("configs", "results")})
    if len(identities) > 1:
        labels = "; ".join(f"{lm_eval_identity(_read_json(p, folder), folder)['label']} ({p.name})" for p in identities.values())
        raise FareError(f"{folder}: holds runs of different models or configurations ({labels}); give each run "
                        "its own --output_path")
    return Run(path=folder, kind="lm-eval", identity=lm_eval_identity(merged, folder), tasks=samples,
               task_configs=merged["configs"], eval_config=_merge_settings(per_file), results=merged["results"],
               results_files=results_paths)


def as_run(run_or_path) -> Run:
    """``run_or_path`` itself when it is a :class:`Run`, else :func:`load_run` of it."""
    return run_or_path if isinstance(run_or_path, Run) else load_run(run_or_path)


def load_run(path) -> Run:
    """Read a run folder (lm-eval ``--output_path`` with ``--log_samples``, or a ``fare run`` folder)."""
    folder = Path(path)
    if not folder.exists():
        raise FareError(f"{folder}: no such folder; pass an lm-eval --output_path folder or a fare run folder")
    if not folder.is_dir():
        raise FareError(f"{folder}: not a folder; pass the lm-eval --output_path folder, not a file in it")
    if not any(folder.iterdir()):
        raise FareError(f"{folder}: empty folder; run lm_eval --log_samples --output_path {folder} first")
    if (folder / FARE_RUN_MANIFEST).is_file():
        manifest = _read_json(folder / FARE_RUN_MANIFEST, folder)
        return Run(path=folder, kind="fare-run", identity=fare_run_identity(manifest),
                   eval_config={"seed": manifest.get("seed"), "sizes": manifest.get("sizes")},
                   results={"manifest": manifest})
    results_paths = list(folder.rglob("results_*.json"))
    if not results_paths:
        if list(folder.rglob("samples_*.jsonl")):
            raise FareError(f"{folder}: samples_*.jsonl without results_*.json (interrupted run?); re-run lm_eval "
                            "--log_samples --output_path to completion")
        raise FareError(f"{folder}: no lm-eval results_*.json or fare run report/manifest.json; pass an lm-eval "
                        "--output_path folder written with --log_samples, or a fare run --out folder")
    return _load_lm_eval(folder, results_paths)


# ----------------------------------------------------------------------------------- samples


def iter_samples(run: Run, task: str) -> Iterator[dict]:
    """Stream the items of one task: ``{doc_id, doc_hash, key, filter, doc, target, resps,
    filtered_resps, values}`` where ``values`` maps each logged metric to its per-item value and
    ``key`` = ``doc_hash#k`` pairs the k-th occurrence of a repeated document (doc_id order)."""
    if task not in run.tasks:
        raise FareError(f"{run.path}: no samples for task {task!r}; logged: {', '.join(sorted(run.tasks)) or 'none'}")
    path = run.tasks[task]
    seen: dict[tuple[str, str], int] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise FareError(f"{path}:{lineno}: not valid JSON ({e.msg}); re-run lm_eval --log_samples") from None
            if "doc_hash" not in rec or "doc_id" not in rec:
                raise FareError(f"{path}:{lineno}: no doc_id/doc_hash; not an lm-eval --log_samples file")
            flt = rec.get("filter", "none")
            k = seen.get((flt, rec["doc_hash"]), 0)
            seen[(flt, rec["doc_hash"])] = k + 1
            names = rec.get("metrics") or []
            yield {
                "doc_id": rec["doc_id"], "doc_hash": rec["doc_hash"], "key": f"{rec['doc_hash']}#{k}", "filter": flt,
                "doc": rec.get("doc"), "target": rec.get("target"), "resps": rec.get("resps"),
                "filtered_resps": rec.get("filtered_resps"), "values": {m: rec[m] for m in names if m in rec},
            }
