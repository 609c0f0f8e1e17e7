"""Rule script: see mrflesion.steps.qmri."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # noqa: F821

from mrflesion import steps  # noqa: E402

steps.main(snakemake, "qmri")  # noqa: F821
