"""Rule script: see mrflesion.steps.inputs.phantom."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # noqa: F821

from mrflesion.steps import inputs, main  # noqa: E402

main(snakemake, inputs.phantom)  # noqa: F821
