"""Rule script: see mrflesion.steps.longitudinal.evaluate_rule."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # noqa: F821

from mrflesion.steps import longitudinal, main  # noqa: E402

main(snakemake, longitudinal.evaluate_rule)  # noqa: F821
