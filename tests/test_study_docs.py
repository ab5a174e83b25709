"""Every key the loader accepts is written, with a comment listing what it allows, in every shipped study.

The keys come from the config schema (the dataclass fields of metafx/config_schema.py and the
hand-parsed keys the loader names in metafx/config.py), so a new setting fails here until each
study in search_spaces/ documents it.
"""
from __future__ import annotations

import re
from dataclasses import Field, fields

import pytest

from metafx.config import (BUDGETS, DISTRIBUTIONS, GRID_KEYS, LOSS_TERMS, SEARCH_PARAM_KEYS, SECTIONS, SPACES_DIR,
                           TOP_KEYS, FamilyConfig)
from metafx.config_schema import GRID_SCALES

SPACES = sorted(p.name for p in SPACES_DIR.glob("*.yaml"))
_KEY = re.compile(r"^(?P<indent> *)(?P<dash>- )?(?P<key>[A-Za-z_][\w.\[\]]*):(?P<rest>.*)$")


def written_keys(text: str) -> dict[str, str]:
    """``{dotted key: its line's comment}`` for every key a study file writes (block style).

    List items become ``name[i]``; keys under ``search.params`` and ``budgets.<b>`` are
    dotted names themselves and are kept whole.
    """
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (indent, path) of the open mappings
    items: dict[str, int] = {}  # path of a list -> index of its current item
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _KEY.match(line)
        if not m:
            continue
        indent = len(m.group("indent"))
        key = m.group("key")
        if m.group("dash"):  # "- key: value": a new item of the list opened by the parent key
            while stack and stack[-1][0] >= indent:
                stack.pop()
            parent = stack[-1][1]
            items[parent] = items.get(parent, -1) + 1
            stack.append((indent, f"{parent}[{items[parent]}]"))
            indent += 2
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = f"{stack[-1][1]}.{key}" if stack else key
        rest = m.group("rest")
        out[path] = rest.split(" #", 1)[1].strip() if " #" in rest else ""
        stack.append((indent, path))
    return out


def schema_leaves() -> list[tuple[str, Field]]:
    """Every setting of the main sections as ``(dotted key, field)``, sections walked into."""
    out: list[tuple[str, Field]] = []

    def walk(cls: type, prefix: str) -> None:
        for f in fields(cls):
            key = f"{prefix}.{f.name}"
            if f.metadata.get("kind") == "section":
                out.append((key, f))
                walk(f.metadata["cls"], key)
            else:
                out.append((key, f))

    for sec, cls in SECTIONS.items():
        walk(cls, sec)
    return out


def _mentions(comment: str, word: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(str(word))}(?![\w])", comment) is not None


def test_the_scanner_reads_nested_keys_and_list_items():
    text = "data:  # d\n  families:  # f\n    - name: a  # n\n      params:  # p\n        cutoff: [1]  # c\n" \
           "  on_unstable: drop  # drop | fail\nsearch:\n  params:  # x\n    maml.inner_lr: {dist: int}\n"
    keys = written_keys(text)
    assert keys["data.families[0].name"] == "n" and keys["data.families[0].params.cutoff"] == "c"
    assert keys["data.on_unstable"] == "drop | fail" and "search.params.maml.inner_lr" in keys


@pytest.mark.parametrize("space", SPACES)
def test_every_accepted_key_is_written_and_commented(space):
    keys = written_keys((SPACES_DIR / space).read_text())
    missing = [k for k in TOP_KEYS if k not in keys]
    assert not missing, f"{space}: top-level keys not written: {missing}"
    for b in BUDGETS:
        assert _mentions(keys["budgets"], b) or f"budgets.{b}" in keys, f"{space}: budget {b} not documented"
    problems = []
    for key, f in schema_leaves():
        if key not in keys:
            problems.append(f"{key}: not written")
            continue
        comment = keys[key]
        if not comment:
            problems.append(f"{key}: no comment")
            continue
        m = f.metadata
        if m.get("kind") == "choice":
            choices = m["choices"]() if callable(m["choices"]) else m["choices"]
            problems += [f"{key}: comment does not list {c!r}" for c in choices if not _mentions(comment, c)]
        if m.get("check") == "loss":
            problems += [f"{key}: comment does not list loss term {t!r}" for t in LOSS_TERMS
                         if not _mentions(comment, t)]
    fam = "data.families[0]"
    for f in fields(FamilyConfig):
        if not keys.get(f"{fam}.{f.name}"):
            problems.append(f"{fam}.{f.name}: not written with a comment")
    grid = keys.get(f"{fam}.params", "")
    problems += [f"{fam}.params: comment does not name {w!r}" for w in (*GRID_KEYS, *GRID_SCALES)
                 if not _mentions(grid, w)]
    search = keys.get("search.params", "")
    problems += [f"search.params: comment does not name {w!r}" for w in (*SEARCH_PARAM_KEYS, *DISTRIBUTIONS)
                 if not _mentions(search, w)]
    assert not problems, f"{space}:\n" + "\n".join(problems)
