"""Rule script: see mrflesion.steps.registration.register_lesion."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # noqa: F821

from mrflesion.steps import main, registration  # noqa: E402

main(snakemake, registration.register_lesion)  # noqa: F821
