"""Rule script: see mrflesion.steps.training.model_record."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # noqa: F821

from mrflesion.steps import main, training  # noqa: E402

main(snakemake, training.model_record)  # noqa: F821
