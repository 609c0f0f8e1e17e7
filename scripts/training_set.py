"""Rule script: see mrflesion.steps.training.training_set."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # noqa: F821

from mrflesion.steps import main, training  # noqa: E402

main(snakemake, training.training_set)  # noqa: F821
