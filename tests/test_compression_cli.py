"""``fare compress`` / ``compress_checkpoint``: --out safety (issue 11), atomic saves, normal file
permissions, --device/--dtype/device_map through the CLI, the Python API and ``compression=``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fare_compression import compress_checkpoint, read_manifest
from fare_compression import checkpoint as ckpt
from fare_core.errors import FareError


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fare(*args, cwd):
    cmd = [sys.executable, "-c", "import sys; from fare_models.cli import main; sys.exit(main())", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_refuses_non_empty_folder_and_file(tmp_path):
    """Refused before any model is loaded: one line naming the value and what is allowed; nothing touched."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text('{"mine": true}')
    afile = tmp_path / "weights.bin"
    afile.write_bytes(b"x")
    for out, words in ((folder, ["not empty", "--overwrite", "new or empty folder"]),
                       (afile, ["existing file", "folder"]),
                       (Path("/proc/fare-no/such"), ["parent of --out", "not writable"])):
        proc = fare("compress", "--model", "fare-tiny:qwen3_moe", "--method", "magnitude", "--out", str(out),
                    cwd=tmp_path)
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        named = out if out.parent.exists() else out.parent  # an unwritable parent is named itself
        assert len(lines) == 1 and str(named) in lines[0], proc.stderr
        for w in words:
            assert w in lines[0]
    assert (folder / "config.json").read_text() == '{"mine": true}' and sorted(os.listdir(folder)) == ["config.json"]
    assert afile.read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "weights.bin"]


def test_checkpoint_atomic_overwrite_and_permissions(tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    man = compress_checkpoint("fare-tiny:qwen3_moe", "magnitude", {"ratio": 0.5}, out, device="cpu", progress=False)
    assert man["method"] == "magnitude" and man["device"] == "cpu" and man["dtype"] == "float32"
    assert read_manifest(out)["params"] == {"ratio": 0.5}
    files = list(out.iterdir())
    assert any(p.name == "model.safetensors" for p in files)
    for p in files:  # safetensors alone would give 0600
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask(), p.name
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp folder left

    with pytest.raises(FareError, match="not empty.*--overwrite"):
        compress_checkpoint("fare-tiny:qwen3_moe", "magnitude", {"ratio": 0.5}, out, progress=False)
    (out / "extra.txt").write_text("old")
    before = (out / "model.safetensors").read_bytes()

    def broken(path):
        raise RuntimeError("reload failed")

    monkeypatch.setattr(ckpt, "check_reload", broken)
    with pytest.raises(RuntimeError, match="reload failed"):  # the old checkpoint survives a failed save
        compress_checkpoint("fare-tiny:qwen3_moe", "magnitude", {"ratio": 0.3}, out, overwrite=True, progress=False)
    assert (out / "extra.txt").read_text() == "old" and (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    monkeypatch.undo()

    compress_checkpoint("fare-tiny:qwen3_moe", "magnitude", {"ratio": 0.3}, out, overwrite=True, progress=False)
    assert not (out / "extra.txt").exists() and read_manifest(out)["params"] == {"ratio": 0.3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_dtype_device_and_bad_values(tmp_path, capsys):
    from safetensors import safe_open

    from fare_models.cli import main as fare_main

    out = tmp_path / "bf16"
    rc = fare_main(["compress", "--model", "fare-tiny:olmoe", "--method", "wanda", "--set", "ratio=0.5",
                    "--calib-n", "4", "--calib-seq-len", "32", "--dtype", "bfloat16", "--device", "cpu",
                    "--out", str(out)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["dtype"] == "bfloat16" and printed["device"] == "cpu"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    man = read_manifest(out)
    assert man["dtype"] == "bfloat16" and man["pipeline"] == "layerwise" and man["device_map"] is None
    for args, words in ((["--dtype", "int3"], ["dtype='int3'", "bfloat16"]),
                        (["--device", "tpu9"], ["device='tpu9'", "cpu, cuda"])):
        assert fare_main(["compress", "--model", "fare-tiny", "--method", "magnitude", "--out",
                          str(tmp_path / "x"), *args]) == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words), err
    if not torch.cuda.is_available():
        with pytest.raises(FareError, match="no CUDA device"):
            compress_checkpoint("fare-tiny", "magnitude", {}, tmp_path / "y", device="cuda")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_fare_moe_compression_device_and_dtype():
    from fare_models.lm import FareMoeLM

    lm = FareMoeLM(pretrained="fare-tiny", compression="hc_smoe", compression_ratio=0.5, compression_calib_n=4,
                   compression_calib_seq_len=32, compression_device="cpu", batch_size=1)
    rec = lm.model.fare_compression
    assert rec["device"] == "cpu" and rec["pipeline"] == "layerwise" and rec["dtype"] == "float32"
    assert rec["params"] == {"ratio": 0.5}
    with pytest.raises(FareError, match="pipeline='sideways'"):
        FareMoeLM(pretrained="fare-tiny", compression="magnitude", compression_pipeline="sideways", batch_size=1)


def test_values_checked_before_the_model_is_loaded(tmp_path, monkeypatch):
    """A 60 GB model is not loaded just to learn that ratio=7 is wrong."""
    import fare_compression.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    cases = [("magnitude", {"ratio": 7}, "ratio=7 is outside"), ("wanda", {"calib_n": 0}, "n=0"),
             ("magnitude", {"ratoi": 0.5}, "unknown parameter.*ratoi.*allowed: .*ratio"),
             ("hc_smoe", {"calib_p": 2}, "p=2 is outside"), ("magnitude", {"structure": "3:2"}, "3:2"),
             ("magnitude", {"pipeline": "sideways"}, "pipeline='sideways'")]
    for method, params, match in cases:
        with pytest.raises(FareError, match=match):
            compress_checkpoint("fare-tiny", method, params, tmp_path / "o")
    with pytest.raises(FareError, match="dtype='fp8'"):
        compress_checkpoint("fare-tiny", "magnitude", {}, tmp_path / "o", dtype="fp8")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", ["magnitude", "gptq_w8a16"])
def test_compressed_model_freed_before_the_reload_check(method, tmp_path, monkeypatch):
    """Never two copies of a large model in memory: the compressed one is released (llm-compressor's
    session and traced-forward namespace included) before the saved checkpoint is reloaded."""
    import gc
    import importlib.util
    import weakref

    if method.startswith("gptq") and importlib.util.find_spec("llmcompressor") is None:
        pytest.skip("llmcompressor not installed")
    refs, alive = [], []
    write, reload_ = ckpt._write, ckpt.check_reload

    def spy_write(model, *a):
        refs.append(weakref.ref(model))
        return write(model, *a)

    def spy_reload(path):
        gc.collect()
        alive.append(refs[0]() is not None)
        return reload_(path)

    monkeypatch.setattr(ckpt, "_write", spy_write)
    monkeypatch.setattr(ckpt, "check_reload", spy_reload)
    params = {"group_size": 32, "calib_n": 4, "calib_seq_len": 32} if method.startswith("gptq") else {}
    compress_checkpoint("fare-tiny:qwen3_moe", method, params, tmp_path / "c", progress=False)
    assert alive == [False]


def test_temp_folders_of_a_killed_compress_are_removed_live_ones_kept(tmp_path):
    """kill -9 during `fare compress` leaves `.NAME.tmp-PID`; the next run removes it (dead pid only)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid no longer runs
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        for pid in (dead.pid, live.pid):
            (tmp_path / f".ckpt.tmp-{pid}").mkdir()
            (tmp_path / f".ckpt.tmp-{pid}" / "model.safetensors").write_bytes(b"half")
        compress_checkpoint("fare-tiny:qwen3_moe", "magnitude", {"ratio": 0.5}, tmp_path / "ckpt", device="cpu",
                            progress=False)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".ckpt.tmp-%d" % live.pid, "ckpt"]
    finally:
        live.kill()
        live.wait()


def test_calibration_source_checked_before_load_and_bad_json_is_one_line(tmp_path, monkeypatch, capsys):
    """A missing calibration file is refused before the model loads; a file that is not JSON lines or
    holds no objects is one line naming the file, the line and what is allowed (no traceback)."""
    import fare_compression.loading as loading
    from fare_compression.calibration import load_source
    from fare_models.cli import main as fare_main

    bad = tmp_path / "calib.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": \n')
    with monkeypatch.context() as m:
        m.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
        with pytest.raises(FareError, match=r"unknown general calibration source '.*nope\.jsonl'; allowed: harmless"):
            compress_checkpoint("fare-tiny", "wanda", {"calib_general": str(tmp_path / "nope.jsonl")}, tmp_path / "o")
    assert fare_main(["compress", "--model", "fare-tiny", "--method", "wanda", "--calib-n", "2", "--calib-seq-len",
                      "16", "--calib-general", str(bad), "--no-progress", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err  # (fare-tiny's first build may print transformers' save progress)
    lines = [ln for ln in err.splitlines() if ln.startswith("fare compress:")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert str(bad) in lines[0] and "line 3 is not valid JSON" in lines[0], lines
    listed = tmp_path / "calib.json"
    listed.write_text("[1, 2]")
    with pytest.raises(FareError, match="records must be JSON objects"):
        load_source(str(listed), "general")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.json", "calib.jsonl"]
