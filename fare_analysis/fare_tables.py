"""FARE's cross-model tables from several ``fare run`` folders (paper Tables 1, 3, 5, 6 and Fig. 3).

Reads only the files ``fare run`` writes (``report/manifest.json``, ``report/table*.csv``,
``report/aals.csv``, ``profile/routing/routing.json``) and the model's ``config.json`` /
safetensors headers when they are on disk; it never imports the pipeline (analysis sits below it).
Also holds :func:`write_table`, the CSV + Markdown writer of the analysis layer.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

from fare_core.errors import FareError
from fare_core.files import atomic_write

from .runs import FARE_RUN_MANIFEST

#: Table stems copied row-wise from each run's report (one row per model), with their titles.
REPORT_TABLES = {
    "table3_architecture": "Table 3: routing descriptors and delta CrowS of FARE, all models",
    "table5_cross_architecture": "Table 5: cross-architecture synthetic ablation (delta CrowS in %p)",
    "table6_main": "Table 6: FARE at lambda* (test split), all models",
}
#: Config fields holding the number of always-active shared experts (1 when a shared-expert MLP exists).
SHARED_COUNT_FIELDS = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")
SHARED_SIZE_FIELDS = ("shared_expert_intermediate_size",)


def md_cell(value, digits: int) -> str:
    """Markdown text of a table value (fixed decimals for floats, lists comma-joined, pipes escaped)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value).replace("|", "\\|")


def csv_cell(value) -> str:
    """CSV text of a table value (floats as repr: full precision, lists |-joined)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "|".join(str(v) for v in value)
    return str(value)


def write_table(rows: Sequence[dict], stem: Path, columns: Sequence[str] | None = None, *, digits: int = 3,
                title: str | None = None, formats: dict | None = None, markdown: bool = True) -> tuple[Path, Path | None]:
    """Write ``stem.csv`` (full precision) and, with ``markdown``, ``stem.md`` atomically; ``formats``
    maps a column to a function giving its Markdown text."""
    cols = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))
    formats = formats or {}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([csv_cell(r.get(c)) for c in cols])
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(formats[c](r) if c in formats else md_cell(r.get(c), digits) for c in cols) + " |"
              for r in rows]
    stem = Path(stem)
    csv_path = atomic_write(stem.with_suffix(".csv"), lambda t: t.write_text(buf.getvalue()))
    if not markdown:
        return csv_path, None
    md_path = atomic_write(stem.with_suffix(".md"), lambda t: t.write_text("\n".join(lines) + "\n"))
    return csv_path, md_path


def is_fare_run(path: Path) -> bool:
    """A ``fare run --out`` folder (it has the report manifest written by the report stage)."""
    return (Path(path) / FARE_RUN_MANIFEST).is_file()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FareError(f"{path}: unreadable ({e.__class__.__name__}); rerun `fare run` into that folder") from None


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _number(text: str):
    try:
        x = float(text)
    except (TypeError, ValueError):
        return text
    return int(x) if x.is_integer() and "." not in text and "e" not in text.lower() else x


def _config_dir(model: str, revision: str | None) -> Path | None:
    """Folder holding the model's config.json, without any download (local path or the HF cache)."""
    if Path(model).is_dir():
        return Path(model)
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return None
    hit = try_to_load_from_cache(model, "config.json", revision=revision)
    return Path(hit).parent if isinstance(hit, str) else None


def _param_count(folder: Path) -> int | None:
    """Parameters summed over the safetensors headers (no tensor is loaded)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for f in files:
        with safe_open(str(f), framework="numpy") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
                total += math.prod(fh.get_slice(name).get_shape())
    return total


def _shared_experts(config: dict) -> int:
    cfg = config.get("text_config", config)
    for key in SHARED_COUNT_FIELDS:
        if cfg.get(key):
            return int(cfg[key])
    return int(any(cfg.get(key) for key in SHARED_SIZE_FIELDS))


def model_config_row(run: Path) -> dict:
    """Table 1 row: experts per layer, top-k, shared experts, MoE layers, parameters."""
    manifest = _read_json(run / FARE_RUN_MANIFEST)
    routing_path = run / "profile" / "routing" / "routing.json"
    routing = _read_json(routing_path) if routing_path.is_file() else {}
    top_k = sorted(set(routing.get("top_k") or []))
    folder = _config_dir(str(routing.get("model") or manifest["model"]), manifest.get("revision"))
    config = _read_json(folder / "config.json") if folder and (folder / "config.json").is_file() else None
    return {"model": manifest["model"], "model_type": manifest.get("model_type", ""),
            "experts": routing.get("num_experts"), "top_k": "/".join(map(str, top_k)) if top_k else None,
            "shared": _shared_experts(config) if config is not None else None,
            "moe_layers": len(routing["layers"]) if routing.get("layers") else None,
            "params": _param_count(folder) if folder else None}


def _human(n) -> str:
    if n in (None, ""):
        return ""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def build_fare_tables(runs: Sequence[Path], out: Path) -> dict[str, Path]:
    """Write Tables 1, 3, 5, 6 (CSV + Markdown, one row per model) and Fig. 3 into ``out``."""
    from . import plots

    runs = [Path(r) for r in runs]
    for r in runs:
        if not is_fare_run(r):
            raise FareError(f"{r}: not a finished `fare run` folder (no report/manifest.json); "
                            f"run `fare run --model M --out {r}` to completion first")
    out = Path(out)
    paths: dict[str, Path] = {}
    t1 = [model_config_row(r) for r in runs]
    paths["table1_models"] = write_table(
        t1, out / "table1_models", ["model", "model_type", "experts", "top_k", "shared", "moe_layers", "params"],
        title="Table 1: model configurations (shared = always-active shared experts)",
        formats={"params": lambda row: _human(row["params"])})[0]
    for stem, title in REPORT_TABLES.items():
        rows = []
        for r in runs:
            f = r / "report" / f"{stem}.csv"
            rows += [{k: _number(v) for k, v in row.items()} for row in _read_csv(f)] if f.is_file() else []
        if rows:
            paths[stem] = write_table(rows, out / stem, digits=2 if stem.startswith("table5") else 3, title=title)[0]
    curves = []
    for r, row in zip(runs, t1):
        f = r / "report" / "aals.csv"  # layer, delta_bias, delta_ppl, R, selected (AALS, Eq. 5)
        if f.is_file():
            a = _read_csv(f)
            curves.append((row["model"], [int(x["layer"]) for x in a],
                           [float(x["R"]) for x in a], [int(x["layer"]) for x in a if x["selected"] == "True"]))
    if curves:
        paths["fig3_aals_ratio"] = plots.aals_curves(curves, out / "fig3_aals_ratio.png")
    return paths
