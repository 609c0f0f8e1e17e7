"""Rule script: see mrflesion.learn_steps.model_record."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # noqa: F821

from mrflesion import learn_steps, steps  # noqa: E402

steps.main(snakemake, "model_record", learn_steps)  # noqa: F821
