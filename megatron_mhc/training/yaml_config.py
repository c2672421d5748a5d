"""YAML run configs: a readable nested file whose values become the defaults of Megatron's flags.

    model:      {num_layers: 4, hidden_size: 128, ...}
    mhc:        {enable_mhc_connections: true, mhc_num_residual_streams: 4, ...}
    train:      {micro_batch_size: 4, train_iters: 300, ...}
    optimizer:  {lr: 3.0e-3, ...}
    data:       {default_corpus: true, tokenizer_type: NullTokenizer, ...}
    checkpoint: {save: runs/tiny, save_interval: 100, ...}
    logging:    {log_interval: 10, tensorboard_dir: runs/tiny/tb, ...}

Keys are the flags' destinations (`--num-layers` -> `num_layers`; hyphens are accepted too);
the section only groups them. Each value is checked against its flag (type, choices, on/off
switches take true/false) and installed as the parser default, so flags given on the command
line override the file; `null` leaves the flag at its own default. An unknown section or key is
an error naming it and the closest valid one.

A top-level `base: other.yaml` (a path relative to the file) makes the file an override: the
values of the base file (which may name its own base) apply first, then the file's own replace
them key by key, so a variant of a config lists only the keys that differ.
"""

import argparse
import difflib
from pathlib import Path
from typing import Any

import yaml

SECTIONS = ("model", "mhc", "parallel", "train", "optimizer", "data", "checkpoint", "logging")
BASE_KEY = "base"


class ConfigError(ValueError):
    """A YAML config that cannot be applied; the message names the file and the key."""


def _closest(name: str, candidates) -> str:
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def _check_value(path: str, key: str, value: Any, actions) -> Any:
    """The value of `key` as its flag would have parsed it, or ConfigError."""
    if value is None:
        return None
    where = f"{path}: {key}={value!r}"
    switches = [
        a for a in actions if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction))
    ]
    if switches:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} is invalid: an on/off switch takes true or false")
        return value
    action = actions[0]
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        values = value if isinstance(value, list) else [value]
        return [_convert(where, action, v) for v in values]
    return _convert(where, action, value)


def _convert(where: str, action: argparse.Action, value: Any) -> Any:
    if action.type is not None and not isinstance(value, bool):
        try:
            value = action.type(value) if isinstance(value, str) else action.type(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
            raise ConfigError(f"{where} is invalid: {err}") from err
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where} is invalid: allowed values are {list(action.choices)}")
    return value


def load_yaml_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The flag defaults that `path` sets over those of its base file, validated against
    `parser`'s flags."""
    by_dest: dict[str, list] = {}
    for action in parser._actions:
        if action.dest not in ("help", argparse.SUPPRESS, "config"):
            by_dest.setdefault(action.dest, []).append(action)
    # null leaves the flag at its own default, as leaving it off the command line does (the
    # command line cannot give None); in an override it undoes the value of its base.
    values = _resolve(path, by_dest, including=())
    return {key: value for key, value in values.items() if value is not None}


def _resolve(path: str, by_dest: dict[str, list], including: tuple[Path, ...]) -> dict[str, Any]:
    """The values of `path` over those of its base; `including` are the files that lead to
    `path` through their bases, outermost first."""
    document = _read(path)
    chain = (*including, Path(path).resolve())
    values: dict[str, Any] = {}
    if BASE_KEY in document:
        base = _base_path(path, document.pop(BASE_KEY), chain)
        values.update(_resolve(str(base), by_dest, chain))
    values.update(_own_values(path, document, by_dest))
    return values


def _read(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            document = yaml.safe_load(f)
    except FileNotFoundError as err:
        raise ConfigError(f"config file {path!r} does not exist") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if document is None:  # an empty file, or comments only
        raise ConfigError(
            f"{path}: the config file is empty; it needs the sections {', '.join(SECTIONS)} "
            f"(or {BASE_KEY!r}: a file to override), e.g. configs/gpt_tiny_mhc.yaml"
        )
    if not isinstance(document, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections {SECTIONS} (and {BASE_KEY!r})"
        )
    return document


def _base_path(path: str, base: Any, chain: tuple[Path, ...]) -> Path:
    if not isinstance(base, str) or not base:
        raise ConfigError(
            f"{path}: {BASE_KEY}={base!r} is invalid: it must be the path of a YAML config, "
            "relative to this file"
        )
    resolved = (Path(path).parent / base).resolve()
    if not resolved.is_file():
        raise ConfigError(f"{path}: {BASE_KEY} {base!r} does not exist (looked for {resolved})")
    if resolved in chain:
        cycle = " -> ".join(p.name for p in (*chain[chain.index(resolved) :], resolved))
        raise ConfigError(f"{path}: {BASE_KEY} {base!r} makes a cycle: {cycle}")
    return resolved


def _own_values(path: str, document: dict, by_dest: dict[str, list]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for section, entries in document.items():
        if section not in SECTIONS:
            closest = _closest(str(section), (*SECTIONS, BASE_KEY))
            raise ConfigError(
                f"{path}: unknown section {section!r}{closest} "
                f"(sections: {', '.join(SECTIONS)}; and {BASE_KEY!r}, a file to override)"
            )
        if not isinstance(entries, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping of key: value")
        for raw_key, value in entries.items():
            key = str(raw_key).replace("-", "_")
            if key not in by_dest:
                raise ConfigError(
                    f"{path}: unknown key {section}.{raw_key}{_closest(key, by_dest)}"
                )
            if key in values:
                raise ConfigError(f"{path}: key {key!r} is set twice")
            values[key] = _check_value(path, f"{section}.{raw_key}", value, by_dest[key])
    return values
