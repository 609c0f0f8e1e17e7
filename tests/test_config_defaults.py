"""Defaults in one place (config.schema.yaml), the networks in one place (the catalogue of
mrflesion.learn.spec): config.yaml states only what the demo changes, config/paper.yaml restores the
defaults for those, docs/configuration.md is generated from the schema."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT
from snakemake.utils import validate

from mrflesion.config import ConfigError, check_config, load_config, load_schema, schema_markdown
from mrflesion.learn.spec import NETWORK_CATALOGUE, TABLE1_NETWORKS, default_networks, resolve_networks

SCHEMA = ROOT / "config.schema.yaml"
DATA = Path(__file__).resolve().parent / "data"
DEMO = [ROOT / "config.yaml"]
PAPER = [ROOT / "config.yaml", ROOT / "config" / "paper.yaml"]

#: config.yaml's networks before they were named from the catalogue (the dicts the training jobs' params
#: hold: a changed key, value or key order would retrain the demo's networks)
DEMO_NETWORKS = [
    {"name": "MTL-5", "loss": "multitask", "inputs": "mrf", "outputs": ["T1", "T2star", "NAWM", "GM", "lesion"],
     "priors": True, "lesion_share": 0.25, "augment": True, "norm": "batch", "ema": 0.99, "mrf_scaling": "measurement",
     "widths": [16, 32, 64], "bridge": 128, "epochs": 50, "lr": 0.002, "lr_halve_every": 15},
    {"name": "MSE-5", "loss": "mse", "inputs": "mrf", "outputs": ["T1", "T2star", "NAWM", "GM", "lesion"]},
    {"name": "DICE-1", "loss": "dice", "inputs": "mrf", "outputs": ["lesion"]},
    {"name": "MSE-2-1", "loss": "mse", "inputs": ["T1", "T2star"], "outputs": ["lesion"]},
]


def _yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _leaves(d: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Every value of a nested mapping by its key path (lists and other values are leaves)."""
    if isinstance(d, dict) and d:
        out: dict[tuple[str, ...], Any] = {}
        for k, v in d.items():
            out.update(_leaves(v, (*prefix, k)))
        return out
    return {prefix: d}


def _schema_default(schema: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = schema
    for key in path:
        node = node["properties"][key]
    return node["default"]


def _same_order(a: Any, b: Any) -> bool:
    return json.dumps(a) == json.dumps(b)


@pytest.mark.parametrize(("name", "files"), [("demo", DEMO), ("paper", PAPER)])
def test_resolved_config_is_frozen(name: str, files: list[Path]) -> None:
    """The config a run gets (defaults filled, networks expanded) equals the frozen copy, the resolution of
    config.yaml (+ config/paper.yaml) as they were when each restated every default, section by section and
    with each section's key order (rule params hold sections; Snakemake compares their repr)."""
    frozen = json.loads((DATA / f"resolved_config_{name}.json").read_text())
    resolved = load_config(*files, schema_path=SCHEMA)
    assert resolved == frozen
    assert [k for k in resolved if not _same_order(resolved[k], frozen[k])] == []


@pytest.mark.parametrize("files", [DEMO, PAPER])
def test_snakemake_validation_fills_nothing_more(files: list[Path]) -> None:
    """check_config's defaults are snakemake.utils.validate's: validating the result changes nothing."""
    resolved = load_config(*files, schema_path=SCHEMA)
    again = copy.deepcopy(resolved)
    validate(again, str(SCHEMA))
    assert _same_order(again, resolved)


def test_config_yaml_states_only_what_differs_from_the_defaults() -> None:
    schema = _yaml(SCHEMA)
    same = []
    for path, value in _leaves(_yaml(ROOT / "config.yaml")).items():
        try:
            default = _schema_default(schema, path)
        except KeyError:
            continue  # no default there (inputs)
        if value == default:
            same.append(".".join(path))
    assert same == []


def test_paper_overlay_is_the_defaults_of_what_the_demo_changes() -> None:
    """Every value config/paper.yaml sets is the schema's default, and it sets every training key (and the
    networks) that config.yaml changes, so that the overlay restores them all."""
    schema, paper, demo = _yaml(SCHEMA), _yaml(ROOT / "config" / "paper.yaml"), _yaml(ROOT / "config.yaml")
    for path, value in _leaves(paper).items():
        assert value == _schema_default(schema, path), ".".join(path)
    assert set(demo["training"]) <= set(paper["training"])
    assert "networks" in paper and paper["networks"] == list(NETWORK_CATALOGUE)


def test_demo_networks_resolve_to_the_entries_they_replace() -> None:
    demo = load_config(*DEMO, schema_path=SCHEMA)
    assert _same_order(demo["networks"], DEMO_NETWORKS)
    entries = _yaml(ROOT / "config.yaml")["networks"]
    assert _same_order(resolve_networks(entries, demo["training"]), DEMO_NETWORKS)
    # without a training section nothing is left out: MTL-5 states the catalogue's dropout
    assert resolve_networks(entries)[0] == {**DEMO_NETWORKS[0], "dropout": 0.0}


def test_catalogue_is_the_schema_default_and_table1() -> None:
    names = list(NETWORK_CATALOGUE)
    assert names[0] == "MTL-5" and tuple(names[1:]) == TABLE1_NETWORKS
    assert _yaml(SCHEMA)["properties"]["networks"]["default"] == names
    assert default_networks() == [NETWORK_CATALOGUE[n] for n in TABLE1_NETWORKS]
    assert all(e["name"] == n for n, e in NETWORK_CATALOGUE.items())
    paper_mtl = {"name": "MTL-5", "loss": "multitask", "inputs": "mrf",
                 "outputs": ["T1", "T2star", "NAWM", "GM", "lesion"], "priors": True, "lesion_share": 0.25,
                 "augment": True, "norm": "batch", "ema": 0.999, "mrf_scaling": "measurement", "dropout": 0.0}
    assert _same_order(NETWORK_CATALOGUE["MTL-5"], paper_mtl)


def test_network_entry_forms() -> None:
    own = {"name": "mine", "loss": "mae", "inputs": ["T1"], "outputs": ["lesion"], "epochs": 3}
    out = resolve_networks(["DICE-1", {"name": "MSE-1", "epochs": 2}, own])
    assert out[0] == NETWORK_CATALOGUE["DICE-1"] and out[0] is not NETWORK_CATALOGUE["DICE-1"]
    assert out[1] == {**NETWORK_CATALOGUE["MSE-1"], "epochs": 2}
    assert out[2] == own
    out[1]["outputs"].append("T1")
    assert NETWORK_CATALOGUE["MSE-1"]["outputs"] == ["lesion"]  # the catalogue is copied


def _base() -> dict[str, Any]:
    return _yaml(ROOT / "config.yaml")


@pytest.mark.parametrize(
    ("networks", "expected"),
    [
        (["MSE-5", "MSE-7"], "invalid config value at networks[1]: 'MSE-7' is not a catalogue network"),
        ([{"name": "mine", "inputs": "mrf", "outputs": ["lesion"]}],
         "invalid config value at networks[0]: 'mine' is not a catalogue network"),
        ([{"name": "MTL-5", "epochs": 0}], "invalid config value at networks.0"),
        (["bad name"], "invalid config value at networks.0"),
    ],
)
def test_bad_network_entry_gives_one_line(networks: list[Any], expected: str) -> None:
    config = _base() | {"networks": networks}
    with pytest.raises(ConfigError) as info:
        check_config(config, SCHEMA)
    message = str(info.value)
    assert message.startswith(expected) and "\n" not in message


def test_an_absent_networks_key_gives_the_catalogue() -> None:
    config = {k: v for k, v in _base().items() if k != "networks"}
    check_config(config, SCHEMA)
    assert [n["name"] for n in config["networks"]] == list(NETWORK_CATALOGUE)
    assert all(isinstance(n, dict) and "loss" in n for n in config["networks"])


def test_docs_configuration_is_generated_from_the_schema() -> None:
    """docs/configuration.md is current: `python -m mrflesion.config --markdown > docs/configuration.md`."""
    schema = load_schema(SCHEMA)
    text = schema_markdown(schema)
    assert (ROOT / "docs" / "configuration.md").read_text() == text
    for key, sub in schema["properties"].items():
        assert sub.get("description"), f"{key}: no description"
        assert f"| `{key}` |" in text
    assert "docs/configuration.md" in (ROOT / "config.yaml").read_text().split("\n\n")[0]
