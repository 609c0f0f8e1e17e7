"""Rule script: see mrflesion.steps.inputs.dataset_description."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # noqa: F821

from mrflesion.steps import inputs, main  # noqa: E402

main(snakemake, inputs.dataset_description)  # noqa: F821
