"""Benchmark data layer: one registry of checksummed files, resolved offline-first.

Every benchmark file fare-moe reads is listed in :data:`FILES` with the public repository and pinned
commit it comes from and its sha256 (taken from each ``SOURCE.md`` of the shared data folder).
:func:`data_file` resolves a file in this order, always verifying the checksum:

1. ``$FARE_DATA_DIR/<benchmark>/<file>`` (the layout of the project's shared data folder);
2. the local cache ``$FARE_CACHE_DIR/data/<benchmark>/<file>`` (default ``~/.cache/fare_moe/data``);
3. a download of the canonical raw URL into that cache (skipped when ``FARE_OFFLINE=1`` or
   ``HF_DATASETS_OFFLINE=1``).

A missing or corrupt file raises :class:`DataError` with a one-line message naming the file, the
expected sha256 and how to set ``FARE_DATA_DIR``. Readers (:func:`read_csv`, :func:`read_jsonl`,
:func:`read_json`) go through :func:`data_file`; :func:`require_columns` and
:func:`require_nonempty` validate what tasks receive.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from fare_core.errors import FareError
from fare_core.files import normal_permissions

#: benchmark -> (GitHub repository, pinned commit) the files were taken from (see SOURCE.md).
_SOURCES: dict[str, tuple[str, str]] = {
    "advbench": ("no-touch-fish/LLM-attack-ignore", "0f505d82e25c15a83b6954db28191b69927a255d"),
    "bbq": ("nyu-mll/BBQ", "bea11bd97d79217245b5871acd247b9d6eb24598"),
    "bold": ("amazon-science/bold", "3ad652c773f5d1e30d5f6f61657ed934d768ecad"),
    "crows_pairs": ("nyu-mll/crows-pairs", "8aaac11c485473159ec9328a65253a5be9a479dc"),
    "do_not_answer": ("pmarruda/promptfoo", "89d5c0794797fdb556f48d8c4b5fc9c1d75968b5"),
    "harmbench": ("busycalibrating/AdversariaLLM", "a4b57364bc2b0785bd0e6f79eec4948e3991b8b0"),
    "refusal_pairs": ("busycalibrating/AdversariaLLM", "f970939273ea17b491fadf6001fddc36ed3ae3ff"),
    "stereoset": ("moinnadeem/StereoSet", "ead7d086a64a192a1eca88e0dd2fd163de375218"),
    "truthfulqa": ("ictnlp/TruthX", "a41093a6ae3bcbcb523759da782de0f329d03d91"),
    "winobias": ("uclanlp/corefBias", "0bce984dd081bbc10b0622f326727a024c607895"),
    "winogender": ("rudinger/winogender-schemas", "1c7f8b481ad8a234b41e9f76a424d6e856e13f7f"),
    "xstest": ("paul-rottger/exaggerated-safety", "d7bb5bd738c1fcbc36edd83d5e7d1b71a3e2d84d"),
}

#: (benchmark, file, path in source repository, sha256, bytes[, (repo, commit) if not the default]).
_ROWS: tuple[tuple, ...] = (
    ("advbench", "harmful_behaviors.csv", "data/advbench/harmful_behaviors.csv",
     "6cd1a5c63c07610d7eb67307772ee5606017ee950b5770ab288a2c487489d3e1", 82125),
    ("advbench", "harmful_strings.csv", "data/advbench/harmful_strings.csv",
     "2c4751403195634f88eb849d923670cb2d9a883bcc3d74456bf2f08141424a15", 34654),
    ("bbq", "Age.jsonl", "data/Age.jsonl",
     "46e805b3fc2d8cbd26eeb8e8430d98cf7b2dc9c83574ff3674e8ce4f0fca2a60", 3091834),
    ("bbq", "Disability_status.jsonl", "data/Disability_status.jsonl",
     "375d40d9b71f056150264445ec189b13934998f3f49a1e311aa7578eb3b45e5f", 1336984),
    ("bbq", "Nationality.jsonl", "data/Nationality.jsonl",
     "a583e74666aec0341ded8aa3983e7cad694eb24de72c254d28b2df3035720090", 2900040),
    ("bbq", "Physical_appearance.jsonl", "data/Physical_appearance.jsonl",
     "e48d7e13508565f4801574e611043470c25c95a0a62af3699cb5ee7cb02608fb", 1347476),
    ("bbq", "Religion.jsonl", "data/Religion.jsonl",
     "cb9555f9f3454a52cd2df85956b59bd7fcca5aa922c8527693b1164d08417616", 1118728),
    ("bbq", "Sexual_orientation.jsonl", "data/Sexual_orientation.jsonl",
     "2c71036b9e7584fe589c42aef32c1a42bc01b9a5e9b1b8704342630cdb08cefd", 729010),
    ("bbq", "Gender_identity.jsonl", "data/Gender_identity.jsonl",
     "8b5adbb368510a97d5775dc43e1c719e0249fe2da33f13c83e3e29edafec7a00", 4331406),
    ("bbq", "Race_ethnicity.jsonl", "data/Race_ethnicity.jsonl",
     "4a9f1214cfaa115ce7f0bdb40609122e431f5152c71b8ca64d665e483b946ae6", 6062426),
    ("bbq", "Race_x_SES.jsonl", "data/Race_x_SES.jsonl",
     "af8e2ae3d0e5be9ebcbfe7149e591d47ff649e263307f4548f7fb12f6a6d83e8", 11222218),
    ("bbq", "Race_x_gender.jsonl", "data/Race_x_gender.jsonl",
     "e5dbba782f8c4e25b99dd5470b5136e2db73dbf401cf6d4a5a3ed31b02f95696", 13094106),
    ("bbq", "SES.jsonl", "data/SES.jsonl",
     "9f92754bb037b0982604b9112705fb81d60a19d9e759c67e4a85e484a070f528", 5696950),
    ("bbq", "additional_metadata.csv", "supplemental/additional_metadata.csv",
     "f36708416b0e7adb81b47ad1926f9c39c2beb611702b73b01e06c9b6c9ffbd3d", 5827321),
    ("bold", "gender_prompt.json", "prompts/gender_prompt.json",
     "a863aaf2492e3c911c39f435005abee2eba5f5edabe836e97de110cd83273054", 197705),
    ("bold", "political_ideology_prompt.json", "prompts/political_ideology_prompt.json",
     "a83ea7cc272971b618231e13bcb5c1d1be5b208c92135c4ffde85be31f8ab4c6", 116434),
    ("bold", "profession_prompt.json", "prompts/profession_prompt.json",
     "5508012069f20419559417e64d8bb2b8d864ebf8afedd21e5ca564393c291794", 510740),
    ("bold", "race_prompt.json", "prompts/race_prompt.json",
     "200337f6c43b09671e580b1df6aea2cdc0196ee02779260e9881da07029e1cb6", 444732),
    ("bold", "religious_ideology_prompt.json", "prompts/religious_ideology_prompt.json",
     "633830ea87d569e5476895a93f68b8f686cb0dcae6d67a1091a9247c5c4c931d", 33223),
    ("crows_pairs", "crows_pairs_anonymized.csv", "data/crows_pairs_anonymized.csv",
     "dfb36986ce0502abbaf7055b9176da3d08d48e07df1251991b5dfbcbceab9d0c", 437764),
    ("do_not_answer", "do_not_answer_data.csv", "examples/donotanswer/dataset/do_not_answer_data.csv",
     "410449674780aa7304512043706f7981f666a79528d11546da34ebdd9595681c", 3912791),
    ("harmbench", "harmbench_behaviors_text_all.csv", "data/behavior_datasets/harmbench_behaviors_text_all.csv",
     "8d81accedd38eaaf8b760618622bb888417d1fd0c86eba65c427a16f1cbb4afc", 198850),
    ("harmbench", "harmbench_behaviors_text_val.csv", "data/behavior_datasets/harmbench_behaviors_text_val.csv",
     "7bfaaa5e2b9b95002c89e2d33c019f58e9e8496e2fc65d368f1eeb8179e69534", 38024),
    ("harmbench", "harmbench_behaviors_text_test.csv", "data/behavior_datasets/harmbench_behaviors_text_test.csv",
     "75d257b3e7428c52eb7b0154318f455af3e01b09a3794b5e2f3d36054f3c0e29", 160828),
    ("harmbench", "strongreject_dataset.csv", "data/behavior_datasets/strongreject_dataset.csv",
     "4dd70357e4ff8b5d0ba5ebafecab5d6dd5633ce8046e3dd1c8bd93e64de44381", 56359, ("busycalibrating/AdversariaLLM", "f970939273ea17b491fadf6001fddc36ed3ae3ff")),
    ("refusal_pairs", "adv_training_behaviors_safe_responses.csv", "data/safe_responses/adv_training_behaviors_safe_responses.csv",
     "0a8b547ae00f99396d09f07bda9cb0413b302d60b43df902caa77b66bfd6c5d8", 10615),
    ("refusal_pairs", "harmful_train.json", "data/refusal_direction/harmful_train.json",
     "8f5c0eac0efd2a7f99084bbe8d0de2c465e31b1997184783c917969d9de9ece1", 34613),
    ("refusal_pairs", "harmful_val.json", "data/refusal_direction/harmful_val.json",
     "305f1d1e6dfa6c50a32d24a18ef815f42b5441eb83e6d7767d242107162fd9f4", 6763),
    ("refusal_pairs", "harmless_val.json", "data/refusal_direction/harmless_val.json",
     "772010758e7d771ef4c7e5e4acdfd7598dcece1a6f383f20d382f640913a2a4d", 780532),
    ("stereoset", "dev.json", "data/dev.json",
     "73a0f31b711688112602e4c3ac6ab1e1a7cadcdd67df6c6fd55501c889676c90", 12502245),
    ("truthfulqa", "v0/TruthfulQA.csv", "TruthfulQA/data/v0/TruthfulQA.csv",
     "8d7dd15f033196140f032d97d30f037da7a7b1192c3f36f9937c1850925335a2", 443723),
    ("truthfulqa", "v0/mc_task.json", "TruthfulQA/data/v0/mc_task.json",
     "6eb4125d25750c0145c4be2dce00440736684ab6f74ce6bff2139571cc758954", 710607),
    ("truthfulqa", "revised/TruthfulQA.csv", "TruthfulQA/TruthfulQA.csv",
     "f9bd9e859cc102cb1f647f1064da7e009be752c416845cf9fa56e6eaae403a7d", 476230),
    ("truthfulqa", "revised/mc_task.json", "TruthfulQA/data/mc_task.json",
     "b3799639bc76c939836d587de7d30b48d91012cb34be04806d33106ce06c162a", 755456),
    ("winobias", "pro_stereotyped_type1.txt.dev", "WinoBias/wino/data/pro_stereotyped_type1.txt.dev",
     "dd55a0d220fe4c0ceb63dd4648223fb4fe1a58d5ad95c116a002ad24b0e292a5", 32786),
    ("winobias", "pro_stereotyped_type1.txt.test", "WinoBias/wino/data/pro_stereotyped_type1.txt.test",
     "db7838907238a758eeb5779e48f38c013b892910d6fe864456c59f04245c6689", 34820),
    ("winobias", "pro_stereotyped_type2.txt.dev", "WinoBias/wino/data/pro_stereotyped_type2.txt.dev",
     "8f0250de723cea9328e3eaf7169e07936f01aa5909ce7aa580db66eb803f4e86", 30884),
    ("winobias", "pro_stereotyped_type2.txt.test", "WinoBias/wino/data/pro_stereotyped_type2.txt.test",
     "ea1c1fd94fa612e3cc44d7fa3cc4cb76021bb63fdf94f9826f430051e9052438", 31749),
    ("winobias", "anti_stereotyped_type1.txt.dev", "WinoBias/wino/data/anti_stereotyped_type1.txt.dev",
     "a4e0ebae344e78b56f657a42e8ae684b9db7747d177c5e7149c0907ebb7f3bf6", 32782),
    ("winobias", "anti_stereotyped_type1.txt.test", "WinoBias/wino/data/anti_stereotyped_type1.txt.test",
     "331db5bd74bfefebf146a60b67645152a4a1991570d2a56f57154103ac361dd2", 34778),
    ("winobias", "anti_stereotyped_type2.txt.dev", "WinoBias/wino/data/anti_stereotyped_type2.txt.dev",
     "763ad829ad724f9a85ead689ba8ca69072020cb1238def6210f0fc6a47b97e59", 30875),
    ("winobias", "anti_stereotyped_type2.txt.test", "WinoBias/wino/data/anti_stereotyped_type2.txt.test",
     "336571ac1ea8c06cd2aba8e5dd2bd98e00acc0c48da3e4ec5ec7e54eb2633a8f", 31769),
    ("winobias", "female_occupations.txt", "WinoBias/wino/data/female_occupations.txt",
     "693bff12286c2c1d46c7d4d45a44a631574710c30b39c1a3001bb7bdebb44ed8", 177),
    ("winobias", "male_occupations.txt", "WinoBias/wino/data/male_occupations.txt",
     "6b82d88847b69d56d207a0c396e9830b031890de585e916e6b4e9bc50672657e", 169),
    ("winobias", "extra_gendered_words.txt", "WinoBias/wino/extra_gendered_words.txt",
     "728554ebab711703e37dc92d9d14acde6e5bfcc28fa5b62b90b34110be7bd854", 1559),
    ("winobias", "generalized_swaps.txt", "WinoBias/wino/generalized_swaps.txt",
     "4d093db96d4386318ec9aafc3cebc458ead06bb02ac81770e278905fbdd4341e", 1723),
    ("winogender", "all_sentences.tsv", "data/all_sentences.tsv",
     "bd69da16bf228cb8df63fd0843aec2d8b5c36a7f21bf8c7b168bcc83932556c8", 83644),
    ("winogender", "templates.tsv", "data/templates.tsv",
     "496f2e2dc77296bcebcdd8865a8dc5715ce22b772de9abb5f531d5b3114c48a0", 14903),
    ("winogender", "occupations-stats.tsv", "data/occupations-stats.tsv",
     "3f7f37c16381a70571356982ea7fe613ac700ad04a6d3b19b9f2be18248df567", 1578),
    ("xstest", "xstest_prompts.csv", "xstest_prompts.csv",
     "11783fb294ed017473ee53c207d71f2161c7672c8d0b037501e78387f801cb5a", 38719),
)


class DataError(FareError):
    """A benchmark file is missing, corrupt, or does not hold what a task needs."""


@dataclass(frozen=True)
class BenchmarkFile:
    """One benchmark file: where it lives upstream (repo @ commit : path) and its sha256."""

    benchmark: str
    name: str
    repo: str
    commit: str
    path: str
    sha256: str
    size: int

    @property
    def key(self) -> str:
        return f"{self.benchmark}/{self.name}"

    @property
    def url(self) -> str:
        return f"https://raw.githubusercontent.com/{self.repo}/{self.commit}/{self.path}"


def _build_registry() -> dict[str, BenchmarkFile]:
    files = {}
    for benchmark, name, path, sha, size, *source in _ROWS:
        repo, commit = source[0] if source else _SOURCES[benchmark]
        entry = BenchmarkFile(benchmark, name, repo, commit, path, sha, size)
        files[entry.key] = entry
    return files


#: ``"<benchmark>/<file>"`` -> :class:`BenchmarkFile`, for every file of every benchmark.
FILES: dict[str, BenchmarkFile] = _build_registry()

_VERIFIED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256 already computed


def lookup(benchmark: str, name: str) -> BenchmarkFile:
    """Registry entry of ``benchmark/name``; unknown names raise :class:`DataError` listing the known ones."""
    key = f"{benchmark}/{name}"
    if key not in FILES:
        known = sorted(f.name for f in FILES.values() if f.benchmark == benchmark)
        if not known:
            raise DataError(f"unknown benchmark {benchmark!r}; known: {', '.join(sorted(_SOURCES))}")
        raise DataError(f"unknown file {key!r}; files of {benchmark!r}: {', '.join(known)}")
    return FILES[key]


def data_dir() -> Path | None:
    value = os.environ.get("FARE_DATA_DIR")
    return Path(value).expanduser() if value else None


def cache_dir() -> Path:
    root = os.environ.get("FARE_CACHE_DIR")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "fare_moe"
    return base / "data"


def downloads_allowed() -> bool:
    return not any(os.environ.get(v, "") not in ("", "0") for v in ("FARE_OFFLINE", "HF_DATASETS_OFFLINE"))


def sha256_of(path: Path) -> str:
    stat = path.stat()
    memo_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo_key not in _VERIFIED:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        _VERIFIED[memo_key] = digest.hexdigest()
    return _VERIFIED[memo_key]


def _how_to_fix(entry: BenchmarkFile) -> str:
    return (
        f"set FARE_DATA_DIR to a directory laid out as <benchmark>/<file> holding {entry.key} "
        f"(e.g. the project's shared/data), or allow a download of {entry.url}"
    )


def _verified(path: Path, entry: BenchmarkFile) -> Path:
    actual = sha256_of(path)
    if actual != entry.sha256:
        raise DataError(
            f"{path}: sha256 {actual} does not match the expected {entry.sha256} for {entry.key}; "
            f"replace the file with the original ({_how_to_fix(entry)})"
        )
    return path


def _download(entry: BenchmarkFile, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{entry.name.replace('/', '_')}.")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(entry.url, timeout=60) as resp:
            out.write(resp.read())
        _verified(Path(tmp), entry)
        normal_permissions(tmp)  # mkstemp creates 0600
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def data_file(benchmark: str, name: str) -> Path:
    """Checksum-verified local path of ``benchmark/name`` (data dir, then cache, then download)."""
    entry = lookup(benchmark, name)
    root = data_dir()
    if root is not None and (root / entry.key).is_file():
        return _verified(root / entry.key, entry)
    cached = cache_dir() / entry.key
    if cached.is_file():
        return _verified(cached, entry)
    where = f"FARE_DATA_DIR={root}" if root is not None else "FARE_DATA_DIR (unset)"
    if not downloads_allowed():
        raise DataError(
            f"{entry.key} not found in {where} nor in the cache {cache_dir()} and downloads are off "
            f"(FARE_OFFLINE/HF_DATASETS_OFFLINE); expected sha256 {entry.sha256}; {_how_to_fix(entry)}"
        )
    try:
        return _download(entry, cached)
    except DataError:
        raise
    except Exception as exc:  # network errors: say what to do instead
        raise DataError(
            f"{entry.key} not found in {where} nor in the cache {cache_dir()}, and downloading {entry.url} "
            f"failed ({type(exc).__name__}: {exc}); expected sha256 {entry.sha256}; {_how_to_fix(entry)}"
        ) from exc


# ----------------------------------------------------------------------------- readers + checks


def require_columns(rows: Sequence[dict], required: Iterable[str], source: str) -> None:
    """Raise :class:`DataError` naming ``source``, the missing columns and the expected ones."""
    required = list(required)
    present = set(rows[0]) if rows else set()
    missing = [c for c in required if c not in present]
    if rows and missing:
        raise DataError(
            f"{source}: missing column(s) {', '.join(missing)}; expected {', '.join(required)}; "
            f"found {', '.join(sorted(present)) or 'none'}"
        )


def require_nonempty(rows: Sequence, source: str) -> None:
    if len(rows) == 0:
        raise DataError(f"{source}: no records (empty dataset); expected at least one")


def metadata_int(name: str, value, minimum: int | None = None) -> int:
    """A task setting (``--metadata`` / YAML) that must be an integer (>= ``minimum``); FareError otherwise."""
    allowed = "an integer" if minimum is None else f"an integer >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().lstrip("-").isdigit():
        raise FareError(f"{name}={value!r}; allowed: {allowed}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise FareError(f"{name}={value}; allowed: {allowed}")
    return value


def _checked(rows: list, source: str, required: Iterable[str] | None) -> list:
    require_nonempty(rows, source)
    if required:
        require_columns(rows, required, source)
    return rows


def read_csv(benchmark: str, name: str, required: Iterable[str] | None = None, delimiter: str = ",") -> list[dict]:
    """Rows of a CSV/TSV benchmark file as dicts (BOM-tolerant), validated."""
    path = data_file(benchmark, name)
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh, delimiter=delimiter))
    return _checked(rows, str(path), required)


def read_jsonl(benchmark: str, name: str, required: Iterable[str] | None = None) -> list[dict]:
    path = data_file(benchmark, name)
    with open(path, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return _checked(rows, str(path), required)


def read_json(benchmark: str, name: str):
    """Parsed JSON of a benchmark file (any shape; validate with the helpers above)."""
    with open(data_file(benchmark, name), encoding="utf-8") as fh:
        return json.load(fh)


def as_dataset(rows: list[dict], split: str = "test", source: str = "dataset"):
    """``datasets.DatasetDict`` with one split, what lm-eval's ``custom_dataset`` must return."""
    import datasets

    require_nonempty(rows, source)
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})
