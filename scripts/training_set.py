"""Rule script: see mrflesion.learn_steps.training_set."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # noqa: F821

from mrflesion import learn_steps, steps  # noqa: E402

steps.main(snakemake, "training_set", learn_steps)  # noqa: F821
