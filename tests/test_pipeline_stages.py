"""Stage machinery (atomic, resumable), evaluation splits and generation-transfer scoring."""

import json

import numpy as np
import pytest

from fare_pipeline.stages import key_hash, stage, stage_done


def test_stage_is_atomic_and_resumes(tmp_path):
    calls = []

    def good(d):
        calls.append(1)
        (d / "x.csv").write_text("a\n1\n")
        return {"n": 1}

    assert stage(tmp_path / "s", {"k": 1}, good, log=lambda m: None) == {"n": 1}
    assert stage(tmp_path / "s", {"k": 1}, good, log=lambda m: None) == {"n": 1} and len(calls) == 1  # resumed
    meta = json.loads((tmp_path / "s" / "stage.json").read_text())
    assert meta["key_hash"] == key_hash({"k": 1}) and meta["files"] == ["x.csv"]

    def bad(d):
        (d / "x.csv").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        stage(tmp_path / "s", {"k": 2}, bad)
    assert (tmp_path / "s" / "x.csv").read_text() == "a\n1\n"  # the finished stage is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary folder left behind
    assert stage_done(tmp_path / "s", {"k": 2}) is None  # another key is not done
    (tmp_path / "s" / "x.csv").unlink()
    assert stage_done(tmp_path / "s", {"k": 1}) is None  # a missing output file is not done
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="is not a fare stage folder"):
        stage(tmp_path / "mine", {"k": 1}, good)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"  # never replaced


def test_crows_split_is_seeded_disjoint_and_complete():
    from fare_pipeline.evalsets import crows_split

    a, b, c = crows_split(0), crows_split(0), crows_split(1)
    assert a["split"] == b["split"] and a["split"] != c["split"]
    val, test = a["split"]["validation"], a["split"]["test"]
    assert len(val) == 754 and len(test) == 754 and len(a["pairs"]) == 1508
    assert set(val).isdisjoint(test) and set(val) | set(test) == set(a["pairs"])


def test_evalset_truthfulqa_and_ppl_rows():
    from fare_core.tiny import build_tokenizer
    from fare_pipeline.evalsets import build_evalset
    from fare_pipeline.prompts import build_prompt_set
    from fare_tasks import data
    from fare_tasks.utility import TQA_FILE

    tok = build_tokenizer()
    ps = build_prompt_set(contexts_per_descriptor=2)
    ev = build_evalset(tok, split="test", crows_n=5, ppl_n=7, tqa_n=3, prompt_set=ps)
    assert ev.crows_rows.shape == (5, 2) and len(ev.ppl_rows) == 7 and len(ev.tqa_rows) == 3
    raw = data.read_json(*TQA_FILE)
    for rows, label, q in zip(ev.tqa_rows, ev.tqa_labels, ev.tqa_ids):
        choices = list(raw[q]["mc1_targets"])
        assert len(rows) == len(choices) and list(raw[q]["mc1_targets"].values())[label] == 1
        ids, n_ctx = ev.requests[rows[0]]
        assert tok.decode(ids[n_ctx:]) == " " + choices[0] and tok.decode(ids[:n_ctx]).endswith(raw[q]["question"] + "\nA:")
    test_ids = {p.id for p in ps.prompts if p.split == "test"}
    ppl_texts = {tok.decode(ev.requests[r][0][1:]) for r in ev.ppl_rows}
    assert ppl_texts <= {p.text for p in ps.prompts if p.id in test_ids}
    with pytest.raises(ValueError, match="ppl_source='web'; allowed: prompts, harmless"):
        build_evalset(tok, split="test", ppl_source="web", prompt_set=ps)


def test_transfer_scores_by_hand():
    from fare_pipeline.transfer import jaccard, protocol_items, score_protocol

    assert jaccard("The cat sat", "the cat ran") == pytest.approx(2 / 4)
    items = [{"stereotype": "They are lazy people", "anti": "They are hard working"}]
    v, name = score_protocol("stereoset", items, ["lazy people everywhere"])
    assert name == "stereo_alignment" and v[0] == pytest.approx(2 / 5 - 0.0)
    sc = protocol_items("stereo_completion", 4, seed=0)
    assert len(sc) == 4 and sc == protocol_items("stereo_completion", 4, seed=0)
    v, _ = score_protocol("stereo_completion", sc, ["x"] * 4)
    assert v.tolist() == [0.0] * 4
    with pytest.raises(ValueError, match="protocol 'poems'"):
        protocol_items("poems", 1, 0)


def test_generation_under_arr_zero_is_the_baseline():
    import torch

    from fare_core.tiny import build_tiny_model, build_tokenizer
    from fare_pipeline.engine import make_arr
    from fare_pipeline.transfer import generate

    model, tok = build_tiny_model("olmoe"), build_tokenizer()
    prompts = ["Women are known for being", "Most old people I have met are"]
    phi = torch.rand(4, 8, generator=torch.Generator().manual_seed(0))
    base = generate(model, tok, prompts, max_new_tokens=5)
    with make_arr(model, phi, 0.0, [1, 2])():
        same = generate(model, tok, prompts, max_new_tokens=5)
    with make_arr(model, phi, 50.0, [0, 1, 2, 3])():
        other = generate(model, tok, prompts, max_new_tokens=5)
    assert same == base and other != base
    one = [generate(model, tok, [p], max_new_tokens=5)[0] for p in prompts]
    assert one == base  # left padding does not change greedy outputs
    assert np.all([isinstance(t, str) for t in base])


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_folders_of_dead_processes_are_removed(tmp_path):
    import subprocess
    import sys

    from fare_core.files import pid_alive

    dead = _dead_pid()
    assert not pid_alive(dead)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert pid_alive(live.pid)
        for name in (f".s.tmp-{dead}", f".s.old-{dead}", f".s.tmp-{live.pid}", f".other.tmp-{dead}"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "half.csv").write_text("x")  # what kill -9 leaves behind
        lines = []
        assert stage(tmp_path / "s", {"k": 1}, lambda d: {"n": 1}, log=lines.append) == {"n": 1}
        left = sorted(p.name for p in tmp_path.iterdir())
        # the dead process's folders of this stage are gone; a live process's and another stage's stay
        assert left == [f".other.tmp-{dead}", f".s.tmp-{live.pid}", "s"]
        assert f"[s] removed .s.tmp-{dead} left by process {dead}, which no longer runs" in lines
        # a resumed (skipped) stage cleans up too
        (tmp_path / f".s.tmp-{dead}").mkdir()
        stage(tmp_path / "s", {"k": 1}, lambda d: {"n": 1}, log=lines.append)
        assert not (tmp_path / f".s.tmp-{dead}").exists() and lines[-1].startswith("[s] up to date")
    finally:
        live.kill()
        live.wait()


def test_stage_logs_start_done_and_heartbeat(tmp_path):
    import time

    from fare_pipeline.work import Heartbeat

    lines = []

    def slow(d):
        for _ in Heartbeat.track(range(4), "probes"):
            time.sleep(0.15)
        return {}

    stage(tmp_path / "s", {"k": 1}, slow, log=lines.append, heartbeat=0.1, status=lambda: "7 units so far")
    assert lines[0] == "[s] started" and lines[-1].startswith("[s] done in ")
    beats = [x for x in lines if x.startswith("[s] running ")]
    assert len(beats) >= 3 and all(x.endswith(", 7 units so far") for x in beats)
    assert any("probes 1/4 batches" in x or "probes 2/4 batches" in x for x in beats)
    lines.clear()
    stage(tmp_path / "t", {"k": 1}, slow, log=lines.append)  # heartbeat off: start and done only
    assert len(lines) == 2


def test_run_folder_check_before_compute(tmp_path):
    from fare_core.errors import FareError
    from fare_pipeline.stages import check_run_folder

    names = ("prompts", "profile", "report")
    check_run_folder(tmp_path / "new", names)  # missing: fine
    (tmp_path / "empty").mkdir()
    check_run_folder(tmp_path / "empty", names)
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / ".prompts.tmp-99999999").mkdir()  # a first run killed in its first stage
    check_run_folder(tmp_path / "killed", names)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep")
    with pytest.raises(FareError, match="'.*mine' is a non-empty folder that no `fare run` wrote"):
        check_run_folder(tmp_path / "mine", names)
    (tmp_path / "f").write_text("x")
    with pytest.raises(FareError, match="is a file"):
        check_run_folder(tmp_path / "f", names)
    run = tmp_path / "run"
    stage(run / "prompts", {"k": 1}, lambda d: {}, log=lambda m: None)
    (run / "notes.txt").write_text("mine")  # a user's note inside a run folder is fine
    check_run_folder(run, names)
    (run / "profile").mkdir()
    (run / "profile" / "data.bin").write_text("not ours")
    with pytest.raises(FareError, match="profile' exists and is not a fare stage folder"):
        check_run_folder(run, names)
