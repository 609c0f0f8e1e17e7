"""Rule script: see mrflesion.steps.tissue.tissue."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # noqa: F821

from mrflesion.steps import main, tissue  # noqa: E402

main(snakemake, tissue.tissue)  # noqa: F821
