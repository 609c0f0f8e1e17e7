"""Configuration: checks with one-line errors naming the offending key, the schema's defaults, the networks.

Every default lives in ``config.schema.yaml``; ``config.yaml`` states what the demo chooses differently
and ``config/paper.yaml`` restores the paper's values (the schema defaults) for those. The networks are
named in the catalogue of :mod:`mrflesion.learn.spec`. ``docs/configuration.md`` lists every key; it is
generated from the schema: ``python -m mrflesion.config --markdown > docs/configuration.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .learn.spec import resolve_networks


class ConfigError(ValueError):
    pass


def schema_path() -> Path:
    """The workflow's ``config.schema.yaml``."""
    from .paths import workflow_root

    return workflow_root() / "config.schema.yaml"


def load_schema(path: str | Path | None = None) -> dict[str, Any]:
    return yaml.safe_load(Path(path or schema_path()).read_text())


def _schema_error(config: Mapping[str, Any], schema: Mapping[str, Any]) -> None:
    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(dict(config)))
    if error is None:
        return
    where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    message = error.message.replace("\n", " ")
    if len(message) > 200:
        message = message[:200] + "..."
    raise ConfigError(f"invalid config value at {where}: {message}")


def fill_defaults(config: MutableMapping[str, Any], schema: Mapping[str, Any]) -> None:
    """Set the schema's ``default`` of every missing key, recursively, as ``snakemake.utils.validate``
    does (there the defaults are filled while validating; here without validating, with copies)."""
    _fill(config, schema)


def _fill(instance: Any, schema: Mapping[str, Any]) -> None:
    props = schema.get("properties")
    if not isinstance(instance, MutableMapping) or not isinstance(props, Mapping):
        return
    for key, sub in props.items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            _fill(instance[key], sub)


def order_as_schema(config: MutableMapping[str, Any], schema: Mapping[str, Any]) -> None:
    """Put the keys of every section in the schema's order (keys the schema does not list after them).

    The rules' parameters hold config sections (``params: cfg=config["dictionary"]``) and Snakemake
    compares their ``repr``, so a section's key order is part of what reruns a job: whether a value comes
    from ``config.yaml``, an overlay or the schema's default must not change it."""
    props = schema.get("properties")
    if not isinstance(props, Mapping):
        return
    keys = [k for k in props if k in config] + [k for k in config if k not in props]
    items = [(k, config[k]) for k in keys]
    config.clear()
    config.update(items)
    for key, value in config.items():
        if isinstance(value, MutableMapping):
            order_as_schema(value, props.get(key, {}))


def check_config(config: MutableMapping[str, Any], schema_path: str | Path | None = None) -> None:
    """Check the config and complete it in place, or raise :class:`ConfigError` with one line
    (``key.path: problem``).

    Completing: the schema's defaults of missing keys, every section's keys in the schema's order
    (:func:`order_as_schema`), and the ``networks:`` entries expanded to full entries
    (:func:`mrflesion.learn.spec.resolve_networks`: catalogue names, or a name with the fields it changes).
    Called by rules/config.smk before ``snakemake.utils.validate`` (which then finds nothing to fill)."""
    schema = load_schema(schema_path)
    _schema_error(config, schema)
    fill_defaults(config, schema)
    try:
        config["networks"] = resolve_networks(config["networks"], config["training"])
    except ValueError as exc:
        raise ConfigError(f"invalid config value at {exc}") from None
    order_as_schema(config, schema)
    _schema_error(config, schema)


def merge(base: MutableMapping[str, Any], overlay: Mapping[str, Any]) -> None:
    """Merge ``overlay`` into ``base`` as Snakemake merges its ``--configfile`` files: mappings key by key,
    any other value (a list too) replaced."""
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), MutableMapping):
            merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def load_config(*paths: str | Path, schema_path: str | Path | None = None) -> dict[str, Any]:
    """The config the workflow runs with for ``--configfile PATHS...`` (defaults filled, networks
    expanded): e.g. ``load_config(ROOT / "config.yaml", ROOT / "config/paper.yaml")``."""
    config: dict[str, Any] = {}
    for p in paths:
        merge(config, yaml.safe_load(Path(p).read_text()) or {})
    check_config(config, schema_path)
    return config


# ------------------------------------------------------------------------------------ the key reference


def _resolve_ref(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = schema.get("$ref")
    if not ref:
        return schema
    target: Any = root
    for part in ref.lstrip("#/").split("/"):
        target = target[part]
    return {**target, **{k: v for k, v in schema.items() if k != "$ref"}}


def _flow(value: Any) -> str:
    """A value as YAML flow text (one line)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value and yaml.safe_load(value) == value and ":" not in value else json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    return str(value)


def _type_text(schema: Mapping[str, Any], root: Mapping[str, Any]) -> str:
    s = _resolve_ref(schema, root)
    if "oneOf" in s or "anyOf" in s:
        return " or ".join(_type_text(o, root) for o in s.get("oneOf", s.get("anyOf")))
    types = s.get("type", "any")
    types = [types] if isinstance(types, str) else list(types)
    text = " or ".join(types)
    if "enum" in s:
        text += ": " + " / ".join(_flow(v) for v in s["enum"])
    if "array" in types and isinstance(s.get("items"), Mapping):
        inner = _resolve_ref(s["items"], root)
        if "properties" not in inner:
            text += " of " + _type_text(inner, root)
        else:
            kinds = inner.get("type", "object")
            text += " of " + " or ".join([kinds] if isinstance(kinds, str) else kinds)
    bounds = [f"{label} {s[k]}" for k, label in (("minimum", ">="), ("exclusiveMinimum", ">"),
                                                   ("maximum", "<="), ("exclusiveMaximum", "<"))
              if k in s]
    if "multipleOf" in s:
        bounds.append(f"multiple of {s['multipleOf']}")
    if bounds:
        text += " (" + ", ".join(bounds) + ")"
    return text


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _rows(props: Mapping[str, Any], root: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, ...]]:
    for key, sub in props.items():
        s = _resolve_ref(sub, root)
        default = f"`{_flow(s['default'])}`" if "default" in s else ""
        nested = s.get("properties")
        if isinstance(nested, Mapping) and "default" in s and s["default"] == {}:
            default = "(its keys' defaults)"
        elif "default" not in s and key in root.get("required", []) and not prefix:
            default = "required"
        yield (f"`{prefix}{key}`", _type_text(s, root), default, _cell(s.get("description", "")))
        if isinstance(nested, Mapping):
            yield from _rows(nested, root, f"{prefix}{key}.")


def schema_markdown(schema: Mapping[str, Any]) -> str:
    """docs/configuration.md: every key of the schema with its type, default and description."""
    lines = [
        "# Configuration",
        "",
        "<!-- generated from config.schema.yaml by `python -m mrflesion.config --markdown > "
        "docs/configuration.md`; tests/test_config_defaults.py checks that it is current -->",
        "",
        "Every key of the configuration, with its type, its default and what it does. The defaults are the "
        "schema's (`config.schema.yaml`, the only place that states them): `config.yaml` holds only what the "
        "demo chooses differently, and `config/paper.yaml` (an overlay: `--configfile config.yaml "
        "config/paper.yaml`) restores the paper's values (the defaults) for those. A run's config is "
        "checked against the schema at start-up; a wrong value stops it with one line naming the key.",
        "",
        "| key | type | default | description |",
        "| --- | --- | --- | --- |",
    ]
    for row in _rows(schema["properties"], schema):
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mrflesion.config", description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", action="store_true", help="print docs/configuration.md (from the schema)")
    ap.add_argument("--resolved", nargs="+", metavar="CONFIGFILE",
                    help="print the config these files give (defaults filled, networks expanded) as JSON")
    ap.add_argument("--schema", type=Path, help="the schema (default: the workflow's config.schema.yaml)")
    args = ap.parse_args(argv)
    if args.markdown:
        sys.stdout.write(schema_markdown(load_schema(args.schema)))
    elif args.resolved:
        try:
            json.dump(load_config(*args.resolved, schema_path=args.schema), sys.stdout, indent=1)
        except ConfigError as exc:
            print(f"mrflesion: {exc}", file=sys.stderr)
            return 1
        sys.stdout.write("\n")
    else:
        ap.print_usage()
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
