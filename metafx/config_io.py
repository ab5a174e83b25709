"""Study files as plain mappings: finding, reading and writing YAML, and dotted-key access and overrides.

Nothing here knows the study's settings (that is :mod:`metafx.config`): these helpers
move raw mappings between files, ``--set key=value`` overrides and MLflow's flat
parameter names. :class:`ConfigError` is defined here, the lowest layer that raises it;
import it from :mod:`metafx.config`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
SPACES_DIR = REPO_ROOT / "search_spaces"

_INDEX = re.compile(r"^(?P<name>[^\[\]]+)\[(?P<i>\d+)\]$")


class ConfigError(ValueError):
    """A study file or override is invalid. The message names file, key, value and the fix.

    Args:
        message: the whole message (one line).
        key: the dotted key at fault, when one key is (``None`` for rules across keys).
        allowed: what that key allows, or how to fix it (the end of the message).
    """

    def __init__(self, message: str, *, key: str | None = None, allowed: str | None = None):
        super().__init__(message)
        self.key = key
        self.allowed = allowed


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys (empty mappings and lists are kept as values).

    Args:
        d: a nested mapping, e.g. :meth:`metafx.config.Config.to_dict`.
        prefix: prepended to every key.

    Returns:
        ``{"maml.inner_lr": 0.1, ...}``.
    """
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def set_dotted(d: dict[str, Any], key: str, value: Any, *, where: str = "override") -> None:
    """Set ``a.b.c`` (or ``data.families[0].max_tasks``) in a nested dict, in place.

    Missing sections are created. Under ``search.params`` the rest of the key is one
    (dotted) parameter name, so ``search.params.maml.inner_lr`` sets that parameter.

    Args:
        d: the nested mapping to change.
        key: the dotted key; ``name[i]`` indexes a list.
        value: the value to set.
        where: the start of an error message (file and origin of the override).

    Raises:
        ConfigError: an index past the end of a list, or a key through a value that is not a section.
    """
    parts = key.split(".")
    cur: Any = d
    trail: list[str] = []
    i = 0
    while i < len(parts) - 1:
        p = parts[i]
        if trail == ["search", "params"]:
            break
        m = _INDEX.match(p)
        name = m.group("name") if m else p
        nxt = cur.get(name)
        if m:
            idx = int(m.group("i"))
            if not isinstance(nxt, list) or idx >= len(nxt):
                raise ConfigError(f"{where}: cannot set {key!r}: {name!r} has no item [{idx}]")
            nxt = nxt[idx]
        elif nxt is None:
            nxt = cur[name] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{where}: cannot set {key!r}: {p!r} is a {type(nxt).__name__}, not a section")
        cur = nxt
        trail.append(name)
        i += 1
    cur[".".join(parts[i:])] = value


def get_dotted(d: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """The value at a dotted key of a nested mapping.

    Args:
        d: the nested mapping.
        key: ``a.b.c`` (no list indices).
        default: returned when a part of the key is missing.

    Returns:
        The value, or ``default``.
    """
    cur: Any = d
    for p in key.split("."):
        if not isinstance(cur, Mapping) or p not in cur:
            return default
        cur = cur[p]
    return cur


def lookup_dotted(d: Mapping[str, Any], key: str) -> tuple[bool, Any]:
    """Find ``a.b.c`` (or ``data.families[0].params``) in a nested mapping, as :func:`set_dotted` reads keys.

    Under ``search.params`` the rest of the key is one (dotted) parameter name.

    Args:
        d: the nested mapping.
        key: the dotted key; ``name[i]`` indexes a list.

    Returns:
        ``(True, value)``, or ``(False, None)`` when a part of the key is missing.
    """
    parts = key.split(".")
    cur: Any = d
    trail: list[str] = []
    for i, p in enumerate(parts):
        if trail == ["search", "params"]:
            rest = ".".join(parts[i:])
            return (True, cur[rest]) if isinstance(cur, Mapping) and rest in cur else (False, None)
        m = _INDEX.match(p)
        name = m.group("name") if m else p
        if not isinstance(cur, Mapping) or name not in cur:
            return False, None
        cur = cur[name]
        if m:
            idx = int(m.group("i"))
            if not isinstance(cur, list) or idx >= len(cur):
                return False, None
            cur = cur[idx]
        trail.append(name)
    return True, cur


def inline_yaml(value: Any) -> str:
    """A value as one line of YAML flow style (``{low: 300, high: 4000}``, ``[0.0, 0.4]``, ``null``).

    Args:
        value: a plain value, mapping or sequence (paths and numpy scalars are converted).

    Returns:
        The text, without a trailing newline or document end marker.
    """
    text = yaml.safe_dump(_plain(value), default_flow_style=True, sort_keys=False, width=1 << 30).strip()
    return text[:-4].rstrip() if text.endswith("\n...") else text  # a scalar document ends with "..."


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``--set key=value``, the value as YAML (so 1e-3, true, [1, 2] work).

    Args:
        text: ``key=value``.

    Returns:
        ``(key, value)``.

    Raises:
        ConfigError: no ``=`` in ``text``.
    """
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, for example --set maml.inner_lr=0.05")
    key, val = text.split("=", 1)
    return key.strip(), yaml.safe_load(val)


def resolve_space(space: str | os.PathLike[str]) -> Path:
    """Find a study file.

    Args:
        space: a study name (``lstm``, ``lstm.yaml``) in search_spaces/, or a path to a YAML file.

    Returns:
        The file's absolute path.

    Raises:
        ConfigError: not found; the message lists the shipped studies.
    """
    p = Path(space)
    candidates = [p] if p.suffix in (".yaml", ".yml") else [p.with_suffix(".yaml"), p]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    for c in candidates:
        if (SPACES_DIR / c.name).is_file() and len(c.parts) == 1:
            return (SPACES_DIR / c.name).resolve()
    known = ", ".join(sorted(x.name for x in SPACES_DIR.glob("*.yaml")))
    raise ConfigError(f"study {str(space)!r} not found as a path or in {SPACES_DIR}; known studies: {known}")


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a study file as a raw mapping (not validated).

    Args:
        path: the YAML file.

    Returns:
        Its top-level mapping.

    Raises:
        ConfigError: not valid YAML, or the top level is not a mapping.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with data/model/maml/eval sections")
    return data


def dump_config(raw: Mapping[str, Any], path: Path, header: str = "") -> None:
    """Write a resolved mapping as a study YAML that :func:`metafx.config.load_config` accepts.

    Atomic: written to ``<path>.tmp`` and renamed.

    Args:
        raw: e.g. :meth:`metafx.config.Config.to_dict`; paths and numpy scalars become plain values.
        path: the file to write.
        header: text put before the YAML (e.g. ``# comment`` lines).
    """
    text = yaml.safe_dump(_plain(dict(raw)), sort_keys=False, default_flow_style=None)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text((header + "\n" if header else "") + text, encoding="utf-8")
    os.replace(tmp, path)


def _plain(x: Any) -> Any:
    """``x`` with mappings, sequences, paths and numpy scalars turned into YAML-safe values."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
        return x.item()
    return x
