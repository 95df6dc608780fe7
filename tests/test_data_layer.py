"""Data layer: registry matches the real files and SOURCE.md; resolution order; clear errors."""

import hashlib
import io
import re
import shutil
from pathlib import Path

import pytest

from fare_tasks import data

CROWS = "crows_pairs/crows_pairs_anonymized.csv"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_registry_covers_every_benchmark_file(data_dir):
    on_disk = {
        str(p.relative_to(data_dir))
        for p in data_dir.rglob("*")
        if p.is_file() and p.name not in {"SOURCE.md", "README.md", "LICENSE"}
    }
    assert on_disk == set(data.FILES)


def test_registry_matches_source_md_and_files(data_dir):
    for entry in data.FILES.values():
        source_md = (data_dir / entry.benchmark / "SOURCE.md").read_text()
        row = next(l for l in source_md.splitlines() if l.startswith(f"| {entry.name} |"))
        assert entry.sha256 in row and f"{entry.size:,}" in row, entry.key
        assert re.search(rf"^- {re.escape(entry.repo)} @ {entry.commit}$", source_md, re.M), entry.key
        path = data_dir / entry.key
        assert path.stat().st_size == entry.size
        assert _sha256(path) == entry.sha256, entry.key
        assert entry.url == f"https://raw.githubusercontent.com/{entry.repo}/{entry.commit}/{entry.path}"


def test_data_file_prefers_data_dir(data_dir):
    assert data.data_file("crows_pairs", "crows_pairs_anonymized.csv") == data_dir / CROWS


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Empty FARE_DATA_DIR and cache, downloads off."""
    monkeypatch.setenv("FARE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FARE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FARE_OFFLINE", "1")
    (tmp_path / "data").mkdir()
    return tmp_path


def test_missing_file_error_names_file_checksum_and_env(isolated):
    with pytest.raises(data.DataError) as err:
        data.data_file("crows_pairs", "crows_pairs_anonymized.csv")
    msg = str(err.value)
    assert "\n" not in msg
    assert CROWS in msg and data.FILES[CROWS].sha256 in msg and "FARE_DATA_DIR" in msg


def test_corrupt_file_error(isolated, data_dir):
    target = isolated / "data" / CROWS
    target.parent.mkdir(parents=True)
    target.write_bytes((data_dir / CROWS).read_bytes() + b"x")
    with pytest.raises(data.DataError, match=data.FILES[CROWS].sha256) as err:
        data.data_file("crows_pairs", "crows_pairs_anonymized.csv")
    assert str(target) in str(err.value) and _sha256(target) in str(err.value)


def test_cache_used_when_data_dir_lacks_file(isolated, data_dir):
    cached = isolated / "cache" / "data" / CROWS
    cached.parent.mkdir(parents=True)
    shutil.copy(data_dir / CROWS, cached)
    assert data.data_file("crows_pairs", "crows_pairs_anonymized.csv") == cached


def _fake_urlopen(payload: bytes, seen: list):
    def urlopen(url, timeout=None):
        seen.append(url)
        return io.BytesIO(payload)

    return urlopen


def test_download_into_cache_is_verified(isolated, data_dir, monkeypatch):
    monkeypatch.setenv("FARE_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    seen = []
    monkeypatch.setattr(data.urllib.request, "urlopen", _fake_urlopen((data_dir / CROWS).read_bytes(), seen))
    path = data.data_file("crows_pairs", "crows_pairs_anonymized.csv")
    assert seen == [data.FILES[CROWS].url]
    assert path == isolated / "cache" / "data" / CROWS and _sha256(path) == data.FILES[CROWS].sha256


def test_corrupt_download_is_rejected_and_not_cached(isolated, monkeypatch):
    monkeypatch.setenv("FARE_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setattr(data.urllib.request, "urlopen", _fake_urlopen(b"not the file", []))
    with pytest.raises(data.DataError, match="does not match the expected"):
        data.data_file("crows_pairs", "crows_pairs_anonymized.csv")
    assert not any((isolated / "cache").rglob("*.csv*"))


def test_unknown_file_and_benchmark():
    with pytest.raises(data.DataError, match="files of 'crows_pairs': crows_pairs_anonymized.csv"):
        data.lookup("crows_pairs", "nope.csv")
    with pytest.raises(data.DataError, match="unknown benchmark 'nope'; known: advbench"):
        data.lookup("nope", "x.csv")


def test_missing_columns_error():
    rows = [{"a": 1, "b": 2}]
    with pytest.raises(data.DataError) as err:
        data.require_columns(rows, ["a", "sent_more", "bias_type"], "f.csv")
    msg = str(err.value)
    assert msg.startswith("f.csv: missing column(s) sent_more, bias_type; expected a, sent_more, bias_type")


def test_read_csv_validates_columns():
    with pytest.raises(data.DataError, match="missing column\\(s\\) no_such_column"):
        data.read_csv("crows_pairs", "crows_pairs_anonymized.csv", ["sent_more", "no_such_column"])


def test_empty_dataset_error():
    with pytest.raises(data.DataError, match="f.jsonl: no records"):
        data.require_nonempty([], "f.jsonl")
    with pytest.raises(data.DataError, match="no records"):
        data.as_dataset([], source="x")
