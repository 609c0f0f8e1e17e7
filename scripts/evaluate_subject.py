"""Rule script: see mrflesion.steps.evaluation.evaluate_subject."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # noqa: F821

from mrflesion.steps import evaluation, main  # noqa: E402

main(snakemake, evaluation.evaluate_subject)  # noqa: F821
