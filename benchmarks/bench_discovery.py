"""Index a synthetic BIDS dataset of N subjects (empty files) and print the discovery time.

    .venv/bin/python benchmarks/bench_discovery.py --subjects 10000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from bidsfixture import make_dataset  # noqa: E402

from mrflesion.bids import discover  # noqa: E402
from mrflesion.config import load_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--subjects", type=int, default=10000)
    ap.add_argument("--sessions", type=int, default=0, help="sessions per subject (0 = no session level)")
    args = ap.parse_args()
    config = load_config(ROOT / "config.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "bids"
        sessions = [f"{i + 1:02d}" for i in range(args.sessions)] or None
        t0 = time.perf_counter()
        make_dataset(root, args.subjects, sessions=sessions, empty=True)
        t_make = time.perf_counter() - t0
        t0 = time.perf_counter()
        disc = discover(config, root)
        t_disc = time.perf_counter() - t0
    n_units = args.subjects * max(1, args.sessions)
    assert len(disc.subjects) == n_units, (len(disc.subjects), disc.problems[:3])
    print(f"dataset: {args.subjects} subjects, {n_units} subject-sessions (written in {t_make:.1f} s)")
    print(f"discovery: {t_disc:.2f} s for {len(disc.subjects)} subject-sessions, {len(disc.problems)} problems")
    print(f"target < 10 s: {'PASS' if t_disc < 10 else 'FAIL'}")


if __name__ == "__main__":
    main()
