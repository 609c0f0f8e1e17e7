"""Rule script: see mrflesion.steps.mrf_mask."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # noqa: F821

from mrflesion import steps  # noqa: E402

steps.main(snakemake, "mrf_mask")  # noqa: F821
