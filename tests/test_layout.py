"""The path builder (mrflesion.layout): BIDS names, sidecars, and every derivative's name written once."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest
from conftest import ROOT

from mrflesion import layout

#: Fragments of a derivative's file name: an entity other than sub/ses (``_space-T2w``, ``desc-``,
#: ``from-MRF``...), or a suffix the pipeline writes followed by an extension (``_probseg.nii.gz``,
#: ``_xfm.mat``, ``map.nii``).
_ENTITY = r"(?:^|[_/{}])(?:acq|space|label|desc|from|to|mode)-"
_SUFFIX = (r"_(?:probseg|dseg|mask|noisemap|quality|xfm|T1map|T2starmap|TB1map|M0map|MRF|FLAIR|T2w|metrics|curves"
           r"|lesions|quant|report)\.[a-z]")
FRAGMENT = re.compile(rf"{_ENTITY}|{_SUFFIX}|map\.nii")

#: (file, the fragment's string) that may hold a fragment because it is not a derivative's name. Each
#: entry is the whole string literal (an f-string: its source text), so that another string in the same
#: file is still caught.
ALLOWED: dict[tuple[str, str], str] = {
    # none today: the inputs' names (mrflesion.bids, the phantom's raw dataset) have no derivative
    # fragment in code strings, and prose (docstrings) is not scanned
}

#: Scanned: the package, the rules, the Snakefile and the rule scripts (layout.py is the one place).
SCANNED = ["src/mrflesion/**/*.py", "rules/*.smk", "Snakefile", "scripts/*.py"]


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes of a module, its classes and functions (prose, not paths)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _python_strings(text: str) -> list[tuple[int, str]]:
    """(line, text) of every string literal of a Python file but docstrings; an f-string as its source."""
    tree = ast.parse(text)
    skip = _docstrings(tree)
    out = []
    inside_fstring = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            out.append((node.lineno, ast.get_source_segment(text, node) or ""))
            inside_fstring.update(id(v) for v in ast.walk(node) if v is not node)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
                and id(node) not in inside_fstring):
            out.append((node.lineno, node.value))
    return out


def _snakemake_strings(text: str) -> list[tuple[int, str]]:
    """(line, text) of every string token of a Snakemake file (rules do not parse as Python)."""
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.STRING:
            body = re.sub(r"^[A-Za-z]*", "", tok.string)
            quote = 3 if body[:3] in ('"""', "'''") else 1
            out.append((tok.start[0], body[quote:-quote]))
    return out


def spelled_outside(root: Path = ROOT) -> list[str]:
    """``file:line: string`` of each string literal outside layout.py holding a derivative-name fragment."""
    hits = []
    for pattern in SCANNED:
        for path in sorted(root.glob(pattern)):
            rel = path.relative_to(root).as_posix()
            if rel == "src/mrflesion/layout.py" or "/_workflow/" in rel:
                continue
            text = path.read_text()
            strings = _python_strings(text) if path.suffix == ".py" else _snakemake_strings(text)
            for line, s in strings:
                if FRAGMENT.search(s) and (rel, s) not in ALLOWED:
                    hits.append(f"{rel}:{line}: {s!r}")
    return hits


def test_no_derivative_name_outside_the_path_builder() -> None:
    hits = spelled_outside()
    assert not hits, ("derivative names spelled outside mrflesion/layout.py (use layout.derivative / "
                      "layout.bids):\n" + "\n".join(hits))


def test_allow_list_is_current() -> None:
    """Every allowed string still exists (a stale entry would let a new one pass unnoticed)."""
    for (rel, s), why in ALLOWED.items():
        text = (ROOT / rel).read_text()
        strings = {v for _, v in (_python_strings(text) if rel.endswith(".py") else _snakemake_strings(text))}
        assert s in strings, f"{rel}: allowed string no longer there ({why}): {s!r}"


def test_the_scan_catches_a_spelled_name(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "src/mrflesion").mkdir(parents=True)
    (tmp_path / "rules/x.smk").write_text(
        'rule x:\n    output:\n        f"{OUT}/{{stem}}_space-T2w_label-lesion_mask.nii.gz",\n')
    (tmp_path / "src/mrflesion/m.py").write_text('"""Docs may say sub-01_space-T2w_T1map.nii.gz."""\n'
                                                 'X = "{stem}_acq-MRFEPI_T1map.nii.gz"\nY = f"{base}_mask.nii.gz"\n')
    hits = spelled_outside(tmp_path)
    assert [h.split(":")[0] for h in hits] == ["src/mrflesion/m.py", "src/mrflesion/m.py", "rules/x.smk"], hits


# ---------------------------------------------------------------------------------------- the builder


def test_bids_builds_names_in_entity_order() -> None:
    assert layout.bids("out", subject="01", session="a", datatype="anat", desc="brain", space="T2w",
                       suffix="mask", extension=".nii.gz") \
        == "out/sub-01/ses-a/anat/sub-01_ses-a_space-T2w_desc-brain_mask.nii.gz"
    assert layout.bids(stem="p/sub-01", to="T2w", from_="MRF", mode="image", suffix="xfm", extension=".mat") \
        == "p/sub-01_from-MRF_to-T2w_mode-image_xfm.mat"
    assert layout.bids(acq="MRFEPI", suffix="MRF", extension=".json") == "acq-MRFEPI_MRF.json"
    assert layout.bids(subject="02", suffix="T2w", label=None) == "sub-02/sub-02_T2w"
    with pytest.raises(ValueError, match="unknown BIDS entities"):
        layout.bids(suffix="x", run="1")
    with pytest.raises(ValueError, match="letters and digits"):
        layout.bids(suffix="x", desc="MSE-5")


def test_sidecar_path() -> None:
    for name in ("x_T1map.nii.gz", "x_T1map.nii", "x_T1map.mat", "x_T1map.npz", "x_T1map.tsv"):
        assert layout.sidecar_path(f"a.b/{name}") == "a.b/x_T1map.json"


def test_derivatives_and_their_stems() -> None:
    stem = "sub-01/ses-a/anat/sub-01_ses-a"
    # a few names pinned (the outputs' names are part of the interface: README, downstream users)
    assert layout.derivative("tissue", "NAWM", "o", stem) == f"o/{stem}_space-T2w_label-NAWM_probseg.nii.gz"
    assert layout.derivative("network", "lesion", None, stem, label="MSE5") \
        == f"{stem}_space-T2w_label-lesion_desc-MSE5_probseg.nii.gz"
    assert layout.derivative("register", "lesion", "o") == "o/{stem}_space-T2w_label-lesion_mask.nii.gz"
    reg = layout.derivatives("register", "o", stem, omit=("warp", "inverse_warp"))
    assert list(reg)[:3] == ["rigid", "xfm_json", "T1"]
    for stage, table in layout.TEMPLATES.items():
        for key, template in table.items():
            if "{label}" not in template:
                assert layout.stem_of_path(layout.derivative(stage, key, "o", stem), stage, key) == f"o/{stem}"
    with pytest.raises(ValueError, match="must end with"):
        layout.stem_of_path("o/sub-01_T1map.nii.gz", "register", "rigid")


# ---------------------------------------------------------------------------------------- sidecars


def _sidecar_derivations(text: str) -> list[int]:
    """Lines that derive a ``.json`` name from another path: ``.replace(..., ".json")``,
    ``... + ".json"``, ``f"{base}.json"``, ``.with_suffix(".json")``."""
    def is_json(node: ast.AST) -> bool:
        return isinstance(node, ast.Constant) and node.value == ".json"

    lines = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("replace", "with_suffix", "with_name") and any(is_json(a) for a in node.args):
            lines.append(node.lineno)
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add) and is_json(node.right):
            lines.append(node.lineno)
        elif isinstance(node, ast.JoinedStr) and len(node.values) >= 2 and is_json(node.values[-1]) \
                and isinstance(node.values[-2], ast.FormattedValue):
            lines.append(node.lineno)
    return sorted(lines)


def test_one_sidecar_helper() -> None:
    """A JSON sidecar's path comes from mrflesion.layout.sidecar_path, nowhere else."""
    hits = []
    for path in sorted((ROOT / "src/mrflesion").glob("**/*.py")) + sorted((ROOT / "scripts").glob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel != "src/mrflesion/layout.py" and "/_workflow/" not in rel:
            hits += [f"{rel}:{line}" for line in _sidecar_derivations(path.read_text())]
    assert not hits, "sidecar paths derived outside mrflesion.layout.sidecar_path: " + ", ".join(hits)


def test_the_sidecar_scan_catches_a_derivation() -> None:
    text = 'a = p.replace(".nii.gz", ".json")\nb = base + ".json"\nc = f"{base}.json"\nd = "models.json"\n'
    assert _sidecar_derivations(text) == [1, 2, 3]
