"""Rule script: see mrflesion.evaluate_steps.infer."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # noqa: F821

from mrflesion import evaluate_steps, steps  # noqa: E402

steps.main(snakemake, "infer", evaluate_steps)  # noqa: F821
