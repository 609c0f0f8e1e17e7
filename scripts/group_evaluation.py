"""Rule script: see mrflesion.steps.group.group_evaluation."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # noqa: F821

from mrflesion.steps import group, main  # noqa: E402

main(snakemake, group.group_evaluation)  # noqa: F821
