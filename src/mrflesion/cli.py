"""BIDS-app command line.

    mrflesion BIDS_DIR OUTPUT_DIR participant|group [--participant-label L ...] [--models DIR] [snakemake options]
    mrflesion phantom OUT --subjects N --sites S --seed K [--grid demo|paper] [--longitudinal]

The first form runs the workflow's Snakefile with its config.yaml (those of the source checkout, or
the copy an installed wheel ships: :func:`mrflesion.paths.workflow_root`), overridden by the paths and
labels given here (written to a small config file in the work directory), and passes
every option it does not know on to snakemake (``--cores 8``, ``-n``, ``--profile slurm``...; a
``--profile`` that names no directory here is one of the workflow's ``profiles/``: ``local``, ``slurm``).
``--models DIR`` is apply mode (config ``models``): the trained networks of DIR (a previous run's
``models/``) are applied, nothing is trained (:mod:`mrflesion.model_card`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import yaml

from . import __version__
from .layout import MODELS, file
from .paths import workflow_root


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mrflesion",
        description="MS lesion probability mapping from MR fingerprinting (BIDS app). "
        "Unknown options are passed to snakemake. `mrflesion phantom --help` for the phantom generator.",
    )
    p.add_argument("bids_dir", type=Path, help="input BIDS dataset (never written to)")
    p.add_argument("output_dir", type=Path, help="output BIDS-derivatives dataset")
    p.add_argument("analysis_level", choices=["participant", "group"])
    p.add_argument("--participant-label", "--participant_label", nargs="+", default=[], metavar="LABEL")
    p.add_argument("--exclude-participant-label", nargs="+", default=[], metavar="LABEL")
    p.add_argument("--session-label", nargs="+", default=[], metavar="LABEL")
    p.add_argument("-w", "--work-dir", type=Path, help="intermediate files (default: ./mrflesion_work)")
    p.add_argument("--config-file", type=Path, help="a config.yaml to use instead of the workflow's own")
    p.add_argument("--models", type=Path, metavar="DIR",
                   help="apply mode: trained networks (a previous run's models/ directory: models.json and "
                        "<network>/best.pt, model_card.json); nothing is trained")
    p.add_argument("--version", action="version", version=f"mrflesion {__version__}")
    return p


def _strip_sub(labels: list[str], what: str) -> list[str]:
    out = []
    for label in labels:
        label = label[4:] if label.startswith("sub-") else label
        label = label[4:] if what == "session" and label.startswith("ses-") else label
        if not label.isalnum():
            raise SystemExit(f"mrflesion: invalid {what} label {label!r} (letters and digits only)")
        out.append(label)
    return out


def build_command(argv: list[str]) -> tuple[list[str], Path]:
    """The snakemake command line for a BIDS-app call, and the work directory it runs in."""
    args, extra = _parser().parse_known_args(argv)
    bids_dir = args.bids_dir.resolve()
    output_dir = args.output_dir.resolve()
    if not bids_dir.is_dir():
        raise SystemExit(f"mrflesion: BIDS directory not found: {bids_dir}")
    if output_dir == bids_dir:
        raise SystemExit("mrflesion: OUTPUT_DIR must not be the input dataset's root")
    work_dir = (args.work_dir or Path.cwd() / "mrflesion_work").resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    root = workflow_root()
    overrides = {
        "bids_dir": str(bids_dir),
        "output_dir": str(output_dir),
        "work_dir": str(work_dir),
        "participant_label": _strip_sub(args.participant_label, "participant"),
        "exclude_participant_label": _strip_sub(args.exclude_participant_label, "participant"),
        "sessions": _strip_sub(args.session_label, "session"),
    }
    if args.models is not None:
        models = args.models.resolve()
        record = models / file(MODELS, "record", None)
        if not record.is_file():
            raise SystemExit(f"mrflesion: --models: no {record.name} in {models}")
        overrides["models"] = str(models)
    overlay = work_dir / "mrflesion_cli_config.yaml"
    overlay.write_text(yaml.safe_dump(overrides, sort_keys=False))
    base_config = (args.config_file or root / "config.yaml").resolve()
    cmd = [
        sys.executable, "-m", "snakemake", args.analysis_level,
        "--snakefile", str(root / "Snakefile"),
        "--directory", str(work_dir),
        "--configfile", str(base_config), str(overlay),
    ]
    if not any(a == "--profile" or a.startswith("--profile=") for a in extra):
        cmd += ["--profile", str(root / "profiles" / "local")]
    cmd += _resolve_profile(extra, root)
    return cmd, work_dir


def _resolve_profile(extra: list[str], root: Path) -> list[str]:
    """``--profile P`` as snakemake will find it from the work directory: a directory P here (absolute),
    else the workflow's ``profiles/P`` (``slurm`` or ``profiles/slurm``, also from an installed wheel)."""

    def resolve(value: str) -> str:
        shipped = root / "profiles" / Path(value).name
        if Path(value).is_dir():
            return str(Path(value).resolve())
        if shipped.is_dir() and Path(value) in (Path(shipped.name), Path("profiles", shipped.name)):
            return str(shipped)
        return value

    out = list(extra)
    for i, arg in enumerate(out):
        if arg.startswith("--profile="):
            out[i] = "--profile=" + resolve(arg.partition("=")[2])
        elif arg == "--profile" and i + 1 < len(out):
            out[i + 1] = resolve(out[i + 1])
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "phantom":
        from .phantom import main as phantom_main

        return phantom_main(argv[1:])
    cmd, work_dir = build_command(argv)
    print("mrflesion: running", " ".join(cmd), file=sys.stderr)
    env = dict(os.environ)
    return subprocess.call(cmd, cwd=work_dir, env=env)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
