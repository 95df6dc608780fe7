"""record_routing streams prompts in windows (issue 4: profiling memory does not grow with prompts)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from fare_pipeline import profiling
from fare_pipeline.profiling import record_routing
from fare_pipeline.prompts import build_prompt_set, load_resources

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    from fare_core.tiny import build_tiny_model, build_tokenizer

    return build_tiny_model("olmoe", seed=0), build_tokenizer()


@pytest.fixture(scope="module")
def prompts():
    res = load_resources()
    return build_prompt_set(templates=res["templates"][:3], professions=res["professions"][:4],
                            descriptors={"gender": ["female", "male"], "age": ["old"]}, contexts_per_descriptor="all")


class Forwards:
    """Records each forward's token ids (as prompt texts) via a model pre-hook."""

    def __init__(self, model, tok):
        self.model, self.tok, self.batches = model, tok, []

    def __enter__(self):
        def hook(_, args, kwargs):
            ids, attn = kwargs["input_ids"], kwargs["attention_mask"]
            self.batches.append([self.tok.decode(row[: int(m.sum())].tolist()) for row, m in zip(ids, attn)])

        self.handle = self.model.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _reference_batches(tok, items, batch_size, window):
    """Sort by (token length, id, position) within each window of ``window`` prompts, then cut."""
    out = []
    for s in range(0, len(items), window):
        win = items[s : s + window]
        order = sorted((len(tok(p.text)["input_ids"]), p.id, k) for k, p in enumerate(win))
        out += [[win[k].text for _, _, k in order[i : i + batch_size]] for i in range(0, len(order), batch_size)]
    return out


def _run(model, tok, prompts, **kw):
    with Forwards(model, tok) as f:
        rec = record_routing(model, tok, prompts, **kw)
    return rec, f.batches


def test_one_window_is_one_global_sort(tiny, prompts):
    model, tok = tiny
    items = prompts.prompts
    assert len(items) > 20
    _, got = _run(model, tok, prompts, batch_size=5)
    assert got == _reference_batches(tok, items, 5, len(items))
    _, exact = _run(model, tok, prompts, batch_size=5, window=len(items))  # n == window: same batches
    assert exact == got


def test_windows_sort_within_each_window_and_route_the_same_tokens(tiny, prompts):
    model, tok = tiny
    items = prompts.prompts
    full, _ = _run(model, tok, prompts, batch_size=4)
    rec, got = _run(model, tok, prompts, batch_size=4, window=7)
    assert got == _reference_batches(tok, items, 4, 7)
    assert got != _reference_batches(tok, items, 4, len(items))  # the windows did change the batches
    assert rec.group_names == full.group_names
    np.testing.assert_array_equal(rec.tokens.numpy(), full.tokens.numpy())
    np.testing.assert_array_equal(rec.counts.numpy(), full.counts.numpy())  # right padding: same routing
    np.testing.assert_allclose(rec.prob_sums.numpy(), full.prob_sums.numpy(), rtol=1e-5, atol=1e-6)


def test_iterator_input_is_consumed_one_window_at_a_time(tiny, prompts):
    model, tok = tiny
    items = prompts.prompts
    pulled, seen_at_forward = [0], []

    def gen():
        for p in items:
            pulled[0] += 1
            yield p

    h = model.register_forward_pre_hook(lambda *_: seen_at_forward.append(pulled[0]))
    try:
        rec = record_routing(model, tok, gen(), groups=prompts.groups(), batch_size=2, window=6)
    finally:
        h.remove()
    assert pulled[0] == len(items)
    # while a window's batches run, at most that window (6 prompts) has been pulled from the iterator
    assert seen_at_forward[:3] == [6, 6, 6] and seen_at_forward[3] == 12
    ref = record_routing(model, tok, list(items), groups=prompts.groups(), batch_size=2, window=6)
    np.testing.assert_array_equal(rec.counts.numpy(), ref.counts.numpy())
    np.testing.assert_array_equal(rec.prob_sums.numpy(), ref.prob_sums.numpy())


def test_default_groups_and_errors_for_iterators(tiny, prompts):
    model, tok = tiny
    rec = record_routing(model, tok, prompts, batch_size=8)
    assert rec.group_names == ["neutral", "female", "male", "old"]
    assert record_routing(model, tok, tuple(prompts.prompts), batch_size=8).group_names == rec.group_names
    with pytest.raises(ValueError, match=r"one-shot iterator: pass groups="):
        record_routing(model, tok, iter(prompts.prompts))
    with pytest.raises(ValueError, match="empty prompt set: nothing to profile"):
        record_routing(model, tok, iter([]), groups=["neutral"])
    with pytest.raises(ValueError, match="empty prompt set: nothing to profile"):
        record_routing(model, tok, ())
    with pytest.raises(ValueError, match=r"window=0; must be a positive integer"):
        record_routing(model, tok, prompts, window=0)
    with pytest.raises(ValueError, match=r"prompt group 'old' not in groups"):  # list: before any forward
        record_routing(model, tok, prompts.prompts, groups=["neutral", "female", "male"])
    with pytest.raises(ValueError, match=r"prompt group 'old' not in groups"):  # iterator: per window
        record_routing(model, tok, iter(prompts.prompts), groups=["neutral", "female", "male"], window=4)


def test_progress_total_counts_the_window_batches(tiny, prompts, monkeypatch):
    import tqdm.auto

    model, tok = tiny
    totals, counts = [], []

    class FakeTqdm:
        def __init__(self, it, total=None, **_):
            self.it = it
            totals.append(total)

        def __iter__(self):
            n = 0
            for x in self.it:
                n += 1
                yield x
            counts.append(n)

    monkeypatch.setattr(tqdm.auto, "tqdm", FakeTqdm)
    n = len(prompts)
    record_routing(model, tok, prompts, batch_size=3, window=7, progress=True)
    assert totals == counts == [(n // 7) * 3 + -(-(n % 7) // 3)]
    record_routing(model, tok, iter(prompts.prompts), groups=prompts.groups(), batch_size=3, progress=True)
    assert totals[-1] is None  # unknown length


def test_memory_docstring_states_the_bound():
    doc = " ".join((profiling.__doc__ + profiling.record_routing.__doc__).split())
    assert "O(L x E x G)" in doc and "one window" in doc and "one batch" in doc


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("profiling_memory_bench", REPO / "benchmarks" / "profiling_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # no argparse or measurement at import time
    return mod


def test_benchmark_verdict_uses_the_tolerance():
    bench = _load_benchmark()
    row = lambda n, kib: {"prompts": n, "live_max_kib": kib}
    ok, line = bench.verdict([row(986, 300.0), row(3856, 300.0 + bench.TOLERANCE_KIB)])
    assert ok and "300.0 KiB at 986 prompts vs" in line
    ok, line = bench.verdict([row(3856, 900.0), row(986, 300.0)])
    assert not ok and "FAIL" in line


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallinfo2 and /proc are Linux + glibc only")
def test_benchmark_child_measures_one_size():
    bench = _load_benchmark()
    (r,) = bench.measure([1], batch_size=64)
    assert r["prompts"] == 576 + 41 and r["batches"] == -(-r["prompts"] // 64)
    assert r["tokens"] > r["prompts"] and r["recorder_bytes"] > 0
    assert 0 < r["live_max_kib"] < r["layer_max_kib"]
