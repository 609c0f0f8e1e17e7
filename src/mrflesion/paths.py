"""Where the workflow lies: the Snakefile, rules, scripts, envs, resources, profiles and default configs.

The repository keeps them at its top level; a wheel ships a copy inside the package as
``mrflesion/_workflow/`` (``setup.py``, list in ``pyproject.toml`` ``[tool.mrflesion] workflow``).
Every path to them goes through :func:`workflow_root`.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def workflow_root() -> Path:
    """The directory holding ``Snakefile``, ``config.yaml``, ``rules/``, ``resources/``, ``profiles/``...

    A source checkout or an editable install (this package is ``ROOT/src/mrflesion`` and
    ``ROOT/Snakefile`` exists): ``ROOT``, so that edits to the checkout take effect at once. Otherwise
    (an installed wheel, a container): the copy shipped inside the package, ``mrflesion/_workflow``.
    """
    package = Path(__file__).resolve().parent
    checkout = package.parent.parent
    if package.parent.name == "src" and (checkout / "Snakefile").is_file():
        return checkout
    packaged = files(__package__) / "_workflow"
    if isinstance(packaged, Path) and (packaged / "Snakefile").is_file():
        return packaged.resolve()
    raise FileNotFoundError(
        f"mrflesion: workflow files not found: neither a source checkout ({checkout}/Snakefile) nor the "
        f"packaged copy ({packaged}/Snakefile); install mrflesion from a wheel or with `pip install -e .`"
    )
