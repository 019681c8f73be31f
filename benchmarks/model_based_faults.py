"""The model-based exactness test at length: many seeds x many steps of random interleavings (deletions with
injected backend failures and crashes at every step, retries of earlier request ids, training and derived-adapter
writes racing deletions, restarts), each step checked (nothing served, loaded or stored saw a deleted id; no deleted
byte in the run directory; `s3t verify` passes), each seed's final state compared with the same deletions applied
without faults. CI runs the quick profile (tests/test_exactness.py, 2 seeds x 150 steps).

    .venv/bin/python benchmarks/model_based_faults.py --seeds 10 --steps 300
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import write_result  # noqa: E402
from tests.test_exactness import drive  # noqa: E402


class Env:
    """The two monkeypatch methods the driver uses."""

    def setenv(self, k, v):
        os.environ[k] = v

    def delenv(self, k, raising=True):
        os.environ.pop(k, None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--first-seed", type=int, default=100, help="seeds differ from CI's (0, 1)")
    args = ap.parse_args()
    actions, faults = Counter(), Counter()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        for i, seed in enumerate(range(args.first_seed, args.first_seed + args.seeds)):
            a, f = drive(Path(d) / f"s{seed}", seed, args.steps, Env())
            actions += a
            faults += f
            print(f"seed {seed}: {sum(a.values())} actions, {sum(v for k, v in f.items() if k != 'none')} faults "
                  f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    secs = time.perf_counter() - t0
    lines = [f"# Model-based exactness run: {args.seeds} seeds x {args.steps} steps", "",
             f"Command: `.venv/bin/python benchmarks/model_based_faults.py --seeds {args.seeds} --steps {args.steps}`"
             f" ({secs:.0f} s). Every seed passed every check (a failure raises).", "",
             "| action | count |", "|---|--:|"] + [f"| {k} | {v} |" for k, v in sorted(actions.items())] + [
             "", "| fault injected | count |", "|---|--:|"] + [f"| {k} | {v} |" for k, v in sorted(faults.items())]
    write_result("\n".join(lines) + "\n", Path(__file__).parent / "results" / "model_based_faults.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
