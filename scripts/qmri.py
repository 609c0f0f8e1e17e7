"""Rule script: see mrflesion.steps.qmri.qmri."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # noqa: F821

from mrflesion.steps import main, qmri  # noqa: E402

main(snakemake, qmri.qmri)  # noqa: F821
