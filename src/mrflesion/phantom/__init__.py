"""Digital phantom: a multi-site MRF-EPI MS cohort as BIDS raw data plus ground truth (docs/phantom.md).

Public API: :data:`GRIDS`, :func:`cohort_table`, :func:`generate` and the command line :func:`main`
(``mrflesion phantom OUT --subjects N --sites S --seed K [--grid demo|paper] [--longitudinal] [--jobs J]``).
"""

from __future__ import annotations

import argparse
import sys
import time

from .cohort import cohort_table, generate, site_protocol
from .config import GRIDS

__all__ = ["GRIDS", "cohort_table", "generate", "main", "site_protocol"]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: generate a phantom dataset; prints progress per subject."""
    p = argparse.ArgumentParser(
        prog="mrflesion phantom", description="Generate the mrflesion digital phantom."
    )
    p.add_argument("out", help="output directory (BIDS raw dataset root)")
    p.add_argument("--subjects", type=int, default=12)
    p.add_argument("--sites", type=int, default=2)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--grid", choices=sorted(GRIDS), default="demo")
    p.add_argument("--longitudinal", action="store_true", help="add a follow-up session ses-02")
    p.add_argument("--jobs", type=int, default=1, help="parallel worker processes")
    p.add_argument("--inversion", choices=["perfect", "b1"], default="perfect",
                   help="inversion model of the MRF simulation (perfect: B1-independent, as the dictionary default)")
    p.add_argument("--quiet", action="store_true", help="no per-subject progress")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        table = generate(
            a.out,
            n_subjects=a.subjects,
            n_sites=a.sites,
            seed=a.seed,
            grid=a.grid,
            longitudinal=a.longitudinal,
            n_jobs=a.jobs,
            progress=not a.quiet,
            inversion_efficiency=a.inversion,
        )
    except (FileExistsError, ValueError) as exc:
        print(f"mrflesion phantom: error: {exc}", file=sys.stderr)
        return 2
    print(f"mrflesion phantom: wrote {len(table)} subjects to {a.out} in {time.perf_counter() - t0:.1f} s")
    return 0
