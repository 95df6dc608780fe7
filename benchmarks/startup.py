"""Start-up cost of the lm-eval discovery hook installed by ``fare_moe.pth``.

Runs, interleaved, ``python -c pass`` and ``python -c "import lm_eval"`` with the hook active and
with it disabled (``FARE_MOE_NO_AUTOLOAD=1``), and prints medians, their ratio, and the hook's
own import time from ``python -X importtime``. Needs fare-moe installed (``pip install .``).

    python benchmarks/startup.py [--runs 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def run(code: str, disable: bool) -> float:
    env = dict(os.environ)
    env.pop("FARE_MOE_NO_AUTOLOAD", None)
    if disable:
        env["FARE_MOE_NO_AUTOLOAD"] = "1"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def hook_import_us() -> int:
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True).stderr
    for line in out.splitlines():
        if line.rstrip().endswith("_fare_moe_autoload"):
            return int(line.split("|")[1])  # cumulative microseconds
    raise SystemExit("the fare_moe.pth hook is not installed in this interpreter: run `pip install .` first")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    print(f"hook import time (python -X importtime): {hook_import_us()} us")
    for label, code in (("python -c pass", "pass"), ("python -c 'import lm_eval'", "import lm_eval")):
        on, off = [], []
        for _ in range(args.runs):
            off.append(run(code, disable=True))
            on.append(run(code, disable=False))
        m_on, m_off = statistics.median(on), statistics.median(off)
        spread = statistics.pstdev(off)
        print(f"{label:<28} hook on {m_on * 1e3:7.1f} ms  off {m_off * 1e3:7.1f} ms  ratio {m_on / m_off:.3f}  "
              f"(run-to-run sd {spread * 1e3:.1f} ms, {args.runs} runs each)")


if __name__ == "__main__":
    main()
