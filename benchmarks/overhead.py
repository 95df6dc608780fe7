"""Wall-time overhead of ``fare_moe`` against lm-eval's ``hf`` on the same model and requests.

Prints, side by side from one run, the median time of each mode and its ratio to ``hf``:
none (no hooks), ARR on every MoE layer, and the streaming routing recorder. Modes are
interleaved round by round so machine noise hits all of them alike.

    python benchmarks/overhead.py [--model fare-tiny:qwen3_moe] [--requests 600] [--rounds 5]

Targets (issue 2): none <= 1.02, ARR <= 1.05, recorder <= 1.10.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from fare_models.lm import FareMoeLM
from fare_models.profile import save_profile
from fare_core.tiny import resolve_pretrained
from fare_tasks.data import read_csv


def requests(n: int) -> list[Instance]:
    rows = read_csv("crows_pairs", "crows_pairs_anonymized.csv")
    sents = [r[c] for r in rows for c in ("sent_more", "sent_less")][:n]
    return [Instance(request_type="loglikelihood", doc={}, arguments=("", s), idx=i) for i, s in enumerate(sents)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fare-tiny")
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    path, _ = resolve_pretrained(args.model)
    reqs = requests(args.requests)
    common = dict(batch_size=args.batch_size, device=args.device)
    tmp = tempfile.mkdtemp(prefix="fare-overhead-")
    none = FareMoeLM(pretrained=args.model, **common)
    layers = [layer.index for layer in none.routing.layers]
    E = none.routing.layers[0].num_experts
    phi = torch.rand(len(layers), E, generator=torch.Generator().manual_seed(0))
    profile = save_profile(f"{tmp}/phi.safetensors", phi, layers, none.model_id, none.routing.model_type)
    modes = {
        "hf": HFLM(pretrained=path, **common),
        "fare_moe none": none,
        "fare_moe arr (all layers)": FareMoeLM(pretrained=args.model, intervention="arr", profile=str(profile),
                                               lam=1.0, **common),
        "fare_moe recorder": FareMoeLM(pretrained=args.model, record_routing=f"{tmp}/routing", **common),
    }
    for lm in modes.values():  # warm-up
        lm.loglikelihood(reqs[:64], disable_tqdm=True)
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name, lm in modes.items():
            t0 = time.perf_counter()
            lm.loglikelihood(reqs, disable_tqdm=True)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["hf"])
    print(f"model={args.model} device={args.device} requests={len(reqs)} batch_size={args.batch_size} "
          f"rounds={args.rounds} torch_threads={torch.get_num_threads()}")
    print(f"{'mode':<28}{'median s':>10}{'ratio vs hf':>13}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<28}{med:>10.3f}{med / base:>13.3f}")


if __name__ == "__main__":
    main()
