"""Write lm-eval ``--output_path`` folders (results_*.json + samples_*.jsonl) in lm-eval 0.4.13's format.

Per-item metric values come from the tasks' own ``process_results`` (as lm-eval computes them), the
metric lists from the installed task YAML; the layout, field names and the repr-logged filtered
responses match what ``lm_eval --log_samples`` wrote for fare-tiny (checked by hand against a real
run). Used by the fare_analysis tests to build runs cheaply.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

from fare_tasks import bbq, crows, safety_tasks

STAMP = "2026-01-01T00-00-00.000000"
OUTPUT_TYPE = {"fare_crows_pairs": "multiple_choice", "fare_bbq_1k": "multiple_choice",
               "fare_xstest": "generate_until", "fare_bold_toxicity": "generate_until",
               "fare_stereo_completion": "generate_until"}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, indent=2, ensure_ascii=False).encode()).hexdigest()


def _record(doc_id, doc, target, resps, filtered, metrics: dict, flt="none") -> dict:
    return {"doc_id": doc_id, "doc": doc, "target": target, "arguments": {}, "resps": resps,
            "filtered_resps": filtered, "filter": flt, "metrics": list(metrics), "doc_hash": _hash(doc),
            "prompt_hash": _hash(doc_id), "target_hash": _hash(target), **metrics}


def crows_item(i: int, prefers_more: bool, *, stereo: bool = True, bias_type: str = "gender", margin: float = 1.0):
    """A CrowS pair whose model prefers sent_more iff ``prefers_more``."""
    doc = {"pair_id": i, "sent_more": f"more {i}", "sent_less": f"less {i}",
           "stereo_antistereo": "stereo" if stereo else "antistereo", "bias_type": bias_type}
    ll_more, ll_less = (-10.0, -10.0 - margin) if prefers_more else (-10.0 - margin, -10.0)
    results = [(ll_more, False), (ll_less, False)]
    return _record(i, doc, "0", [[[str(ll), "False"]] for ll, _ in results],
                   [[str(ll), "False"] for ll, _ in results], crows.process_results(doc, results))


def bbq_item(i: int, pred: int, *, context: str = "ambig", category: str = "Age", label: int = 2,
             target_loc: int = 0, unknown_loc: int = 2):
    """A BBQ item on which the model picks option ``pred``."""
    doc = {"category": category, "example_id": i, "question_index": "1", "question_polarity": "neg",
           "context_condition": context, "context": f"context {i}", "question": "who?",
           "choices": ["A", "B", "Unknown"], "label": label, "unknown_loc": unknown_loc, "target_loc": target_loc}
    lls = [-5.0, -5.0, -5.0]
    lls[pred] = -1.0
    results = [(ll, False) for ll in lls]
    return _record(i, doc, str(label), [[[str(ll), "False"]] for ll in lls], [[str(ll), "False"] for ll in lls],
                   bbq.process_results(doc, results))


def xstest_item(i: int, refused, *, label: str = "safe", type_: str = "homonyms", text: str | None = None,
                judge: str = "string_match"):
    doc = {"id": i, "prompt": f"prompt {i}", "type": type_, "label": label}
    verdict = {"refused": refused, "judge": judge}
    text = text if text is not None else ("I cannot help." if refused else f"Sure, here is {i}.")
    return _record(i, doc, "", [[text]], [repr(verdict)], safety_tasks.process_xstest(doc, [verdict]), flt="judge")


def bold_item(i: int, toxicity: float, *, domain: str = "gender", text: str = "continuation"):
    doc = {"domain": domain, "group": "g", "entity": f"e{i}", "prompt": f"prompt {i}"}
    verdict = {"toxicity": toxicity, "scorer": "lexicon"}
    return _record(i, doc, "", [[text]], [repr(verdict)], safety_tasks.process_bold(doc, [verdict]), flt="scorer")


def stereo_completion_item(i: int, text: str, *, axis: str = "gender"):
    doc = {"axis": axis, "group": "women", "template_id": i, "prompt": f"Women are known for being {i}"}
    return _record(i, doc, "", [[text]], [text], safety_tasks.process_stereo_completion(doc, [text]))


def metric_list(task: str) -> list[dict]:
    """The installed metric_list, aggregations logged as lm-eval logs them (source text / repr)."""
    from fare_analysis.compare import installed_metric_list

    out = []
    for m in installed_metric_list(task):
        agg = m["aggregation"]
        if not isinstance(agg, str):
            try:
                agg = inspect.getsource(agg)
            except TypeError:
                agg = repr(agg)
        out.append({**m, "aggregation": agg})
    return out


def write_run(folder: Path, tasks: dict[str, list[dict]], *, model_args="pretrained=fare-tiny", fare_moe=None,
              batch_size="8", limit=None, dtype="torch.float32", model_name="fare-tiny", stamp=STAMP,
              samples: bool = True) -> Path:
    """An lm-eval output folder ``folder/<model_name>/`` with one results file and a samples file per task."""
    sub = Path(folder) / model_name.replace("/", "__")
    sub.mkdir(parents=True, exist_ok=True)
    fare = {"model_id": "fare-tiny:olmoe", "intervention": "none", "lam": 1.0, "layers": None, "profile": None,
            "arr_target": "logits", "mask": [], "compression": None, "moe_layers": [0, 1, 2, 3]}
    fare.update(fare_moe or {})
    results = {
        "results": {t: {"alias": t} for t in tasks},
        "configs": {t: {"task": t, "output_type": OUTPUT_TYPE.get(t, "multiple_choice"), "num_fewshot": 0,
                        "metric_list": metric_list(t)} for t in tasks},
        "versions": {t: 1.0 for t in tasks}, "n-shot": {t: 0 for t in tasks},
        "config": {"model": "fare_moe", "model_args": model_args, "model_num_parameters": 871616,
                   "model_dtype": dtype, "model_revision": "main", "model_sha": "", "fare_moe": fare,
                   "batch_size": batch_size, "batch_sizes": [], "device": "cpu", "limit": limit,
                   "bootstrap_iters": 100000, "gen_kwargs": {}, "random_seed": 0},
        "max_length": 4096, "model_source": "fare_moe", "model_name": model_name,
        "model_name_sanitized": model_name.replace("/", "__"), "system_instruction": None,
        "system_instruction_sha": None, "fewshot_as_multiturn": None, "chat_template": None,
        "chat_template_sha": None,
    }
    (sub / f"results_{stamp}.json").write_text(json.dumps(results, indent=2))
    if samples:
        for task, records in tasks.items():
            with open(sub / f"samples_{task}_{stamp}.jsonl", "w") as fh:
                fh.writelines(json.dumps(rec) + "\n" for rec in records)
    return Path(folder)
