"""Where a benchmark's report lands: ``NAME.json`` (the figures) and ``NAME.md`` (the table a person reads).

Why one writer: every benchmark (``python launch/bench.py ...``) writes the same pair, and each used to
write it its own way (numpy scalars converted by ``default=float`` here and by ``default=str`` there,
some files with a final newline, none written atomically). A report that dies half-written (a full disk,
an interrupt) is worse than the previous one; here each file is written beside its place and moved over
it, so a reader sees the old report or the new one, never a mix.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _plain(value: Any) -> Any:
    """A JSON value for what :mod:`json` cannot write: numpy scalars and arrays, paths, anything else as text."""
    if hasattr(value, "tolist"):  # numpy scalars and arrays, torch tensors
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and an atomic rename.

    Args:
        path: the file (its folder must exist). text: the content, written as UTF-8.

    Returns:
        ``path``.

    Raises:
        OSError: the folder cannot be written (the old file, if any, is kept).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_report(out_dir: Path, name: str, report: dict[str, Any], markdown: str,
                 indent: int = 2) -> tuple[Path, Path]:
    """Write ``out_dir/NAME.json`` and ``out_dir/NAME.md`` (the folder is created).

    Args:
        out_dir: ``benchmarks/`` or the benchmark's ``--out``. name: the benchmark's name.
        report: the figures, with the command that made them; numpy values are written as numbers.
        markdown: the report for a person (a final newline is added where it has none).
        indent: the JSON's indent.

    Returns:
        (the JSON's path, the markdown's path).

    Raises:
        TypeError, ValueError: the report has a value JSON cannot hold (nothing is written then).
        OSError: a file cannot be written (that file's old version is kept).
    """
    text = json.dumps(report, indent=indent, default=_plain) + "\n"  # before anything is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    j = write_text_atomic(out_dir / f"{name}.json", text)
    m = write_text_atomic(out_dir / f"{name}.md", markdown if markdown.endswith("\n") else markdown + "\n")
    return j, m


__all__ = ["write_report", "write_text_atomic"]
