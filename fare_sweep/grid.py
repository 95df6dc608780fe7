"""The sweep grid: read ``GRID.yaml``, validate it before any compute, expand it into cells.

Schema (issue 10 section 1; every list under ``methods`` is a grid axis)::

    models: [fare-tiny, {name: org/model, revision: abc123, resources: {num_gpus: 2}}]
    tasks: [fare_crows_pairs, fare_xstest]
    limit: 20                      # optional lm-eval settings: limit, batch_size, num_fewshot,
    batch_size: 8                  #   apply_chat_template
    calibration: {n: 8, seq_len: 64, seed: 0}
    safety_p: [0.0, 0.5]           # only calibrated methods are repeated over p
    methods:
      magnitude: {ratio: [0.5]}
      wanda: {ratio: [0.5], structure: ["2:4"]}
      arr: {profile: phi.safetensors, lam: [0.5, 1.0]}   # FARE routing interventions
      mask: {mask: ["0:1|0:2"]}
    resources: {num_gpus: 0, num_cpus: 1}    # per cell, on Ray
    device: cpu                    # passed to compression and lm-eval (default: cuda if present)
    dtype: float32                 # default auto: bfloat16 on GPU, float32 on CPU
    device_map: null               # compression: null = one decoder layer at a time on `device`;
                                   #   or a from_pretrained device_map ("auto", ...)
    leaderboard: {n_permutations: 1000}   # options of fare_analysis.leaderboard.build_leaderboard

Each model always gets its dense baseline cell. Errors are :class:`FareError` naming the YAML key.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import itertools
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fare_core.errors import FareError

#: Routing interventions of ``fare_moe`` allowed as sweep methods, with their parameters.
INTERVENTION_PARAMS = {
    "arr": ("profile", "lam", "layers", "arr_target", "profile_check"),
    "mask": ("mask",),
}
DENSE = "dense"
TOP_KEYS = ("models", "tasks", "limit", "batch_size", "num_fewshot", "apply_chat_template", "calibration",
            "safety_p", "methods", "resources", "device", "dtype", "device_map", "leaderboard")
MODEL_KEYS = ("name", "revision", "resources")
RESOURCE_KEYS = ("num_gpus", "num_cpus")
DTYPES = ("auto", "float32", "bfloat16", "float16")
CALIBRATION_KEYS = ("n", "seq_len", "seed", "general", "safety", "stats_tokens", "chat")


@dataclass(frozen=True)
class Cell:
    """One unit of work: a model (dense, compressed or under an intervention) evaluated on the tasks."""

    model: str  # as written in the grid (hub id, path, fare-tiny[:type])
    model_id: str  # canonical identity (fare-tiny -> fare-tiny:olmoe)
    revision: str | None
    method: str  # "dense", a fare_compression method, "arr" or "mask"
    params: dict  # method parameters (one grid point)
    p: float | None  # safety proportion (calibrated methods only)
    calibration: dict | None  # calibration settings (calibrated methods only)
    eval: dict  # tasks, limit, batch_size, num_fewshot, apply_chat_template
    device: str | None
    dtype: str
    resources: dict = field(default_factory=dict)
    device_map: str | dict | None = None  # placement only: not part of any key

    @property
    def calibrated(self) -> bool:
        return self.p is not None

    @property
    def compressed(self) -> bool:
        return self.method not in (DENSE, *INTERVENTION_PARAMS)

    def checkpoint_key(self) -> str | None:
        """Content key of the compressed checkpoint: model+revision, method, params, calibration, dtype.

        Calibration data enter by the sha256 of the records fare_compression reads from each source,
        so the key changes when the data do; the task set does not enter, so every task set reuses
        the checkpoint. Placement (device, device_map) does not enter either.
        """
        if not self.compressed:
            return None
        calib = None
        if self.calibrated:
            calib = {**self.calibration, "p": self.p, "data": calibration_data_hashes(self.calibration)}
        return _digest({"model": self.model_id, "revision": self.revision, "method": self.method,
                        "params": self.params, "calibration": calib, "dtype": self.dtype})

    def key(self) -> str:
        """Content key of the cell's results (checkpoint key or intervention + evaluation settings)."""
        params = dict(self.params)
        if self.method == "arr":
            params["profile"] = _file_sha256(params["profile"])  # content, not path
        return _digest({"model": self.model_id, "revision": self.revision, "method": self.method,
                        "params": params, "checkpoint": self.checkpoint_key(), "eval": self.eval,
                        "dtype": self.dtype})

    def cell_id(self) -> str:
        """Readable, unique folder name: model, method, parameters, p, short key."""
        bits = [self.model_id, self.method]
        for k, v in sorted(self.params.items()):
            v = Path(v).stem if k == "profile" else v
            bits.append(f"{k}{v}")
        if self.p is not None:
            bits.append(f"p{self.p:g}")
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(map(str, bits))).strip("-")[:100]
        return f"{slug}__{self.key()[:10]}"

    def label(self) -> str:
        params = " ".join(f"{k}={Path(v).name if k == 'profile' else v}" for k, v in sorted(self.params.items()))
        p = f" p={self.p:g}" if self.p is not None else ""
        return f"{self.model_id} {self.method}{' ' + params if params else ''}{p}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Cell:
        return cls(**d)


@dataclass
class Grid:
    cells: list[Cell]
    source: dict  # the YAML as read
    path: Path | None = None
    leaderboard: dict = field(default_factory=dict)  # build_leaderboard options


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _file_sha256(path) -> str:
    from fare_tasks.data import sha256_of

    return sha256_of(Path(path))


def calibration_data_hashes(calibration: dict) -> dict:
    """sha256 of the records of each calibration source (general, safety), as fare_compression reads them."""
    import inspect

    from fare_compression.calibration import build_calibration

    defaults = inspect.signature(build_calibration).parameters
    return {role: _source_sha256(str(calibration.get(role) or defaults[role].default), role)
            for role in ("general", "safety")}


@functools.cache
def _source_sha256(name: str, role: str) -> str:
    from fare_compression.calibration import load_source

    try:
        records = load_source(name, role)
    except ValueError as e:  # FareError, or fare_tasks' DataError (missing / corrupt data file)
        _fail(f"calibration.{role}", str(e))
    return _digest([asdict(r) for r in records])


# ----------------------------------------------------------------------------- validation helpers


def _fail(key: str, msg: str):
    raise FareError(f"grid key {key!r}: {msg}")


def _suggest(name: str, allowed) -> str:
    close = difflib.get_close_matches(str(name), list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(d: dict, allowed, where: str) -> None:
    for k in d:
        if k not in allowed:
            _fail(f"{where}{k}" if where else k,
                  f"unknown key{_suggest(k, allowed)}; allowed: {', '.join(allowed)}")


def _axis(value, key: str) -> list:
    """A YAML list is a grid axis; a scalar is a one-point axis. Duplicate points are an error."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        _fail(key, "empty list: no cells")
    seen = []
    for v in values:
        if isinstance(v, (dict, list)):
            _fail(key, f"value {v!r} must be a scalar (every list is a grid axis)")
        if v in seen:
            _fail(key, f"duplicate value {v!r}: would give duplicate cells")
        seen.append(v)
    return values


def _nonneg_int(value, key: str, minimum: int = 0):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(key, f"{value!r} is not an integer >= {minimum}")
    return value


def _resources(value, key: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        _fail(key, f"{value!r} is not a mapping like {{num_gpus: 1}}")
    _check_keys(value, RESOURCE_KEYS, f"{key}.")
    out = {}
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or not math.isfinite(v):
            _fail(f"{key}.{k}", f"{v!r} is not a number >= 0")
        out[k] = v
    return out


def _models(value, base_resources: dict) -> list[tuple[str, str, str | None, dict]]:
    from fare_core.tiny import is_tiny_spec, parse_tiny_spec

    if not value:
        _fail("models", "no models: list at least one (hub id, local path or fare-tiny[:type])")
    out, seen = [], {}
    for i, entry in enumerate(value if isinstance(value, list) else [value]):
        key = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            _fail(key, f"{entry!r} is not a model name or a mapping with 'name' (and optional 'revision')")
        _check_keys(entry, MODEL_KEYS, f"{key}.")
        name, revision = entry["name"], entry.get("revision")
        if revision is not None and not isinstance(revision, str):
            revision = str(revision)
        if is_tiny_spec(name):
            try:
                model_id = f"fare-tiny:{parse_tiny_spec(name)}"
            except ValueError as e:
                _fail(key, str(e))
        else:
            model_id = name
        ident = (model_id, revision)
        if ident in seen:
            _fail(key, f"duplicate model {name!r} (same as models[{seen[ident]}]): would give duplicate cells")
        seen[ident] = i
        out.append((name, model_id, revision, {**base_resources, **_resources(entry.get("resources"), f"{key}.resources")}))
    return out


def _safety_p(value) -> list[float]:
    values = _axis([0.0] if value is None else value, "safety_p")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= v <= 1.0):
            _fail("safety_p", f"{v!r} is not a proportion in [0, 1]")
        out.append(float(v))
    return out


def _calibration(value) -> dict:
    value = value or {}
    if not isinstance(value, dict):
        _fail("calibration", f"{value!r} is not a mapping like {{n: 8, seq_len: 64, seed: 0}}")
    _check_keys(value, CALIBRATION_KEYS, "calibration.")
    for k in ("n", "seq_len"):
        _nonneg_int(value.get(k), f"calibration.{k}", 1)
    _nonneg_int(value.get("seed"), "calibration.seed", 0)
    return dict(value)


def _method_points(name: str, params, grid_dir: Path | None) -> list[dict]:
    """Every grid point of one method's parameter axes, validated."""
    from fare_compression import METHODS

    key = f"methods.{name}"
    if params is None:
        params = {}
    if not isinstance(params, dict):
        _fail(key, f"{params!r} is not a mapping of parameter -> list of values")
    if name in INTERVENTION_PARAMS:
        allowed = INTERVENTION_PARAMS[name]
    elif name in METHODS:
        allowed = METHODS[name].params
    else:
        allowed_methods = [*METHODS, *INTERVENTION_PARAMS]
        _fail(key, f"unknown method{_suggest(name, allowed_methods)}; allowed: {', '.join(allowed_methods)}")
    for p in params:
        if p not in allowed:
            hint = " (calibration settings go under the top-level 'calibration' key)" if p.startswith("calib") else ""
            _fail(f"{key}.{p}", f"unknown parameter for {name!r}{_suggest(p, allowed)}{hint}; allowed: {', '.join(allowed)}")
    axes = {p: _axis(v, f"{key}.{p}") for p, v in params.items()}
    if name in METHODS:  # values too (ratio range, structure, ...), with fare_compression's own checks
        from fare_compression.methods import check_params

        for p, values in axes.items():
            for v in values:
                try:
                    check_params(name, {p: v}, device="cpu")
                except FareError as e:
                    _fail(f"{key}.{p}", str(e))
    if name == "arr":
        _check_arr(axes, key, grid_dir)
    if name == "mask":
        if "mask" not in axes:
            _fail(f"{key}.mask", "missing: list the layer:expert pairs to mask, e.g. ['0:1|0:2']")
        from fare_models.args import parse_mask

        for v in axes["mask"]:
            try:
                if not parse_mask(v):
                    raise ValueError("no pairs")
            except ValueError as e:
                _fail(f"{key}.mask", f"{v!r} is not a layer:expert list like '3:5|3:7' ({e})")
    names = list(axes)
    return [dict(zip(names, combo)) for combo in itertools.product(*(axes[n] for n in names))]


def _check_arr(axes: dict, key: str, grid_dir: Path | None) -> None:
    from fare_models.args import parse_lam, parse_layers

    if "profile" not in axes:
        _fail(f"{key}.profile", "missing: ARR needs a phi profile file (fare profile writes one)")
    resolved = []
    for v in axes["profile"]:
        path = Path(str(v)).expanduser()
        if not path.is_absolute() and grid_dir is not None:
            path = grid_dir / path
        if not path.is_file():
            _fail(f"{key}.profile", f"{v!r} is not a file")
        resolved.append(str(path.resolve()))
    axes["profile"] = resolved
    for v in axes.get("lam", []):
        try:
            parse_lam(v)
        except ValueError as e:
            _fail(f"{key}.lam", str(e))
    for v in axes.get("layers", []):
        try:
            parse_layers(v)
        except ValueError as e:
            _fail(f"{key}.layers", str(e))


def check_tasks(tasks) -> list[str]:
    """Every task name must be known to lm-eval's TaskManager with fare's tasks registered."""
    from .evaluate import task_manager

    if not tasks:
        _fail("tasks", "no tasks: list at least one lm-eval task, e.g. [fare_crows_pairs]")
    names = _axis(tasks, "tasks")
    for t in names:
        if not isinstance(t, str):
            _fail("tasks", f"{t!r} is not a task name")
    known = task_manager(names).all_tasks
    for t in names:
        if t not in known:
            _fail("tasks", f"unknown task {t!r}{_suggest(t, known)}; `lm_eval ls tasks` lists them")
    return names


# ----------------------------------------------------------------------------- loading


def load_grid(path) -> Grid:
    """Read and validate ``GRID.yaml``; raise FareError naming the YAML key on any problem."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FareError(f"{path}: grid file not found; pass a YAML file (see examples/sweep_tiny.yaml)")
    try:
        source = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise FareError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(source, dict):
        raise FareError(f"{path}: the grid must be a YAML mapping with keys {', '.join(TOP_KEYS)}")
    return expand(source, path.parent.resolve(), path)


def expand(source: dict, grid_dir: Path | None = None, path: Path | None = None, check_task_names: bool = True) -> Grid:
    """Validate ``source`` (a parsed grid) and expand it into cells, dense baselines first."""
    from fare_compression import METHODS

    _check_keys(source, TOP_KEYS, "")
    base_resources = _resources(source.get("resources"), "resources")
    models = _models(source.get("models"), base_resources)
    tasks = check_tasks(source.get("tasks")) if check_task_names else _axis(source.get("tasks"), "tasks")
    ev = {"tasks": list(tasks), "limit": source.get("limit"), "batch_size": source.get("batch_size", 1),
          "num_fewshot": source.get("num_fewshot"), "apply_chat_template": source.get("apply_chat_template", False)}
    limit = ev["limit"]
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
        _fail("limit", f"{limit!r} is not a positive number (items per task, or a fraction < 1)")
    bs = ev["batch_size"]
    if not (isinstance(bs, int) and not isinstance(bs, bool) and bs >= 1) and not (isinstance(bs, str) and bs.startswith("auto")):
        _fail("batch_size", f"{bs!r} is not an integer >= 1 or 'auto'")
    _nonneg_int(ev["num_fewshot"], "num_fewshot")
    if not isinstance(ev["apply_chat_template"], (bool, str)):
        _fail("apply_chat_template", f"{ev['apply_chat_template']!r} is not true/false or a template name")
    dtype = str(source.get("dtype", "auto"))
    if dtype not in DTYPES:
        _fail("dtype", f"{dtype!r} is not one of {', '.join(DTYPES)}")
    device = source.get("device")
    if device is not None and not (isinstance(device, str) and re.fullmatch(r"cpu|cuda(:\d+)?|mps|auto", device)):
        _fail("device", f"{device!r} is not cpu, cuda, cuda:N, mps or auto")
    device_map = source.get("device_map")
    if device_map is not None and not isinstance(device_map, (str, dict)):
        _fail("device_map", f"{device_map!r} is not a from_pretrained device_map (\"auto\", \"cuda\" or a mapping)")
    calibration = _calibration(source.get("calibration"))
    ps = _safety_p(source.get("safety_p"))
    methods = source.get("methods") or {}
    if not isinstance(methods, dict):
        _fail("methods", f"{methods!r} is not a mapping of method -> parameter axes")
    if DENSE in methods:
        _fail(f"methods.{DENSE}", "the dense baseline of every model is always a cell; remove this entry")
    points = {name: _method_points(name, params, grid_dir) for name, params in methods.items()}

    cells: list[Cell] = []
    for name, model_id, revision, res in models:
        common = {"model": name, "model_id": model_id, "revision": revision, "eval": ev, "device": device,
                  "dtype": dtype, "resources": res, "device_map": device_map}
        cells.append(Cell(method=DENSE, params={}, p=None, calibration=None, **common))
        for method, method_points in points.items():
            calibrated = method in METHODS and METHODS[method].calibrated
            for params in method_points:
                for p in (ps if calibrated else [None]):
                    cells.append(Cell(method=method, params=params, p=p,
                                      calibration=calibration if calibrated else None, **common))
    keys = {}
    for c in cells:
        k = c.key()
        if k in keys:
            raise FareError(f"grid key 'methods': cells {keys[k].label()!r} and {c.label()!r} are the same cell")
        keys[k] = c
    return Grid(cells=cells, source=source, path=path, leaderboard=_leaderboard_options(source.get("leaderboard")))


def _leaderboard_options(value) -> dict:
    """Keyword options of ``build_leaderboard`` (anything but its inputs, output and overwrite)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        _fail("leaderboard", f"{value!r} is not a mapping of build_leaderboard options")
    import inspect

    from fare_analysis.leaderboard import build_leaderboard

    allowed = [n for n, p in inspect.signature(build_leaderboard).parameters.items()
               if p.kind == p.KEYWORD_ONLY and n not in ("overwrite", "log")]
    _check_keys(value, allowed, "leaderboard.")
    from fare_analysis.compare import require_int

    for k, v in value.items():
        minimum = {"seed": 0, "n_permutations": 1, "n_bootstrap": 1, "n_agg_permutations": 1, "n_jobs": 1}.get(k)
        if minimum is not None and not (k == "n_agg_permutations" and v is None):
            try:
                require_int(minimum, **{k: v})
            except FareError as e:
                _fail(f"leaderboard.{k}", str(e))
    return dict(value)
