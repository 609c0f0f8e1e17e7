"""Time `snakemake -n` (DAG and plan) on a synthetic BIDS dataset of N subjects (empty files).

    .venv/bin/python benchmarks/bench_dag.py --subjects 1000 --profile profiles/slurm [--repeat 3]

Each repeat is a fresh `snakemake -n` process (Python start-up, parsing, discovery, DAG, the printed
plan); the median and the slowest are reported, with the time of a fixed pure-Python loop before and
after (the speed of a shared machine varies over time; compare runs at similar loop times).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from bidsfixture import make_dataset  # noqa: E402


def reference_loop() -> float:
    """Seconds of a fixed pure-Python loop: this machine's speed at the time (shared VMs vary)."""
    t0 = time.perf_counter()
    s = 0
    for i in range(10_000_000):
        s += i * i % 7
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--subjects", type=int, default=1000)
    ap.add_argument("--profile", default=None)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = make_dataset(Path(tmp) / "bids", args.subjects, empty=True)
        cmd = [
            sys.executable, "-m", "snakemake", "-n", "--quiet", "rules", "--cores", "2",
            "--snakefile", str(ROOT / "Snakefile"), "--directory", tmp,
            "--config", f"bids_dir={root}", f"output_dir={tmp}/out", f"work_dir={tmp}/work",
        ]
        if args.profile:
            cmd += ["--profile", str(ROOT / args.profile)]
        times = []
        loops = [reference_loop()]
        for i in range(args.repeat):
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:])
                raise SystemExit(f"snakemake -n failed with status {proc.returncode}")
            if "skipping" in proc.stderr:
                raise SystemExit("subjects were skipped: " + proc.stderr[-2000:])
            jobs = [line for line in proc.stdout.splitlines() if line.strip().startswith("total")]
            print(f"run {i + 1}: {times[-1]:.1f} s ({jobs[-1].strip() if jobs else '?'})", flush=True)
        loops.append(reference_loop())
    elapsed = statistics.median(times)
    print(f"snakemake -n on {args.subjects} subjects: median {elapsed:.1f} s, slowest {max(times):.1f} s "
          f"over {len(times)} runs")
    print(f"reference loop (machine speed) before/after: {loops[0]:.2f} / {loops[1]:.2f} s")
    print(f"target < 30 s (slowest run): {'PASS' if max(times) < 30 else 'FAIL'}")


if __name__ == "__main__":
    main()
