"""Rule script: see mrflesion.steps.training.train_network."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # noqa: F821

from mrflesion.steps import main, training  # noqa: E402

main(snakemake, training.train_network)  # noqa: F821
