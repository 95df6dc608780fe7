"""Requests per second of each fare_* task on fare-tiny (CPU by default).

    python benchmarks/tasks.py                      # every fare_* task, 20 docs each
    python benchmarks/tasks.py --tasks fare_crows_pairs,fare_bbq --limit 100 --device cuda

Loads the model once, then runs each task separately through ``lm_eval.simple_evaluate`` and prints,
per task: seconds to build it (data loading + checks), docs, requests (one per scored choice /
rolling document / generation), seconds to evaluate and requests per second of the evaluation.
Needs FARE_DATA_DIR (or the cache).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def all_task_names() -> list[str]:
    import yaml

    from task_configs import TASK_DIR

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    names = []
    for path in sorted(TASK_DIR.rglob("*.yaml")):
        cfg = yaml.load(path.read_text(), Loader=Loader) or {}
        if isinstance(cfg.get("task"), str) and "group" not in cfg:
            names.append(cfg["task"])
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=None, help="comma-separated task names (default: every fare_* task)")
    parser.add_argument("--limit", type=int, default=20, help="docs per task")
    parser.add_argument("--model", default="fare-tiny", help="fare-tiny[:type], local dir or hub id")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from fare_core.tiny import resolve_pretrained
    from task_configs import TASK_DIR

    pretrained, _ = resolve_pretrained(args.model)
    tasks = args.tasks.split(",") if args.tasks else all_task_names()
    lm = HFLM(pretrained=pretrained, device=args.device, batch_size=args.batch_size)
    manager = TaskManager(include_path=str(TASK_DIR), metadata={"pretrained": pretrained})

    print(f"model={args.model} device={args.device} batch_size={args.batch_size} limit={args.limit}")
    print(f"{'task':36s} {'load_s':>7s} {'docs':>6s} {'requests':>9s} {'eval_s':>8s} {'req/s':>8s}")
    for task in tasks:
        start = time.perf_counter()
        built = list(manager.load([task])["tasks"].values())
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        out = lm_eval.simple_evaluate(model=lm, tasks=built, task_manager=manager, limit=args.limit,
                                      bootstrap_iters=0, log_samples=True)
        eval_s = time.perf_counter() - start
        samples = [s for per_task in out["samples"].values() for s in per_task]
        requests = sum(len(s["arguments"]) for s in samples)
        print(f"{task:36s} {load_s:7.2f} {len(samples):6d} {requests:9d} {eval_s:8.2f} {requests / eval_s:8.1f}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
