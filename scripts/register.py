"""Rule script: see mrflesion.anat_steps.register."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # noqa: F821

from mrflesion import anat_steps, steps  # noqa: E402

steps.main(snakemake, "register", anat_steps)  # noqa: F821
