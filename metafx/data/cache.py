"""The atomic, content-addressed dataset cache: publish a directory whole or not at all, and the file writes behind it.

Nothing here imports ``dawdreamer``: asking whether a dataset is cached
(``is_complete(dataset_path(cfg))``) needs no audio engine.

A dataset lives in ``<cache_dir>/<hash>`` (:func:`metafx.data.plan.dataset_hash`).
:func:`build_dataset` writes it into ``<hash>.tmp-<host>-<pid>-<random>`` in the same
``cache_dir`` and renames it to ``<hash>`` as the very last step, after
``manifest.json`` (the completeness marker, :func:`is_complete`) is written and every
file is fsynced. A killed writer leaves only a ``.tmp-`` entry, which is never read and
is removed by the next build on the same host once its process is gone
(:func:`clean_stale_tmp`, :func:`clean_stale_parts`). Two processes building the same
hash race harmlessly: the first rename wins and the other uses the winner's directory.

Large arrays are written row by row (:class:`RowWriter`): the ``.npy`` header and
the file size come from ``np.lib.format.open_memmap``, each row goes in with
``os.pwrite`` at its offset, so only one row is ever in memory and no mapping of the
whole file inflates the writer's resident memory. :class:`RowReader` reads rows back
with ``os.pread`` (compaction, assembling parts).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from metafx.config import DataConfig
from metafx.data.plan import Part, RenderError, dataset_key, hash_key

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"

#: This host's name as it appears in ``.tmp-<host>-<pid>-<random>`` names.
HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
_DATASET_TMP = re.compile(r"^(?P<hash>[0-9a-f]+)\.tmp-(?P<host>.+)-(?P<pid>\d+)-(?P<rand>[0-9a-f]+)$")
_PART_TMP = re.compile(r"^(?P<name>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)-(?P<rand>[0-9a-f]+)$")


@dataclass(frozen=True)
class RenderResult:
    """What a render call produced: the complete dataset directory, and whether this call wrote it.

    It is an ``os.PathLike`` of :attr:`path`, so ``Path(result)`` and ``TaskSet(result)`` work.
    """

    path: Path
    rendered: bool  # False: found complete in the cache (or another process finished it first)

    def __fspath__(self) -> str:
        return str(self.path)


def is_complete(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a finished dataset directory.

    Args:
        path: a directory (it need not exist).

    Returns:
        True if its ``manifest.json`` exists (the manifest is written last).
    """
    return (Path(path) / MANIFEST).is_file()


def tmp_sibling(path: Path) -> Path:
    """A fresh temporary name beside ``path``: ``<name>.tmp-<host>-<pid>-<random>``.

    Args:
        path: the final name.

    Returns:
        The temporary path (not created); :func:`clean_stale_tmp` / :func:`clean_stale_parts`
        recognize it once this process is gone.
    """
    return path.with_name(f"{path.name}.tmp-{HOST}-{os.getpid()}-{secrets.token_hex(4)}")


# --------------------------------------------------------------------------- entries left by dead processes


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _left_by_dead(root: Path, pattern: re.Pattern[str]) -> Iterator[tuple[Path, int]]:
    """Entries of ``root`` named by ``pattern`` (groups ``host``, ``pid``) whose process, on this host, is gone.

    Entries of other hosts (a shared cache) are never yielded: their pids mean nothing here.
    """
    if not root.is_dir():
        return
    for p in root.iterdir():
        m = pattern.match(p.name)
        if not m or m.group("host") != HOST:
            continue
        pid = int(m.group("pid"))
        if pid != os.getpid() and not _pid_alive(pid):
            yield p, pid


def clean_stale_tmp(cache_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove ``<hash>.tmp-<host>-<pid>-*`` dirs left by dead renderers on this host.

    Directories from other hosts (a shared cache) are left alone: their pids mean nothing here.

    Args:
        cache_dir: the dataset cache.

    Returns:
        The removed directories.
    """
    removed = []
    for d, pid in _left_by_dead(Path(cache_dir), _DATASET_TMP):
        if not d.is_dir():
            continue
        log.info("removing %s, left by a render (pid %d) that did not finish", d, pid)
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def clean_stale_parts(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove ``*.tmp-<host>-<pid>-*`` files in a parts directory left by dead processes of this host.

    Args:
        out_dir: a parts directory (:func:`metafx.data.plan.parts_dir`).

    Returns:
        The removed files.
    """
    removed = []
    for f, _ in _left_by_dead(Path(out_dir), _PART_TMP):
        f.unlink(missing_ok=True)
        removed.append(f)
    return removed


# --------------------------------------------------------------------------- durable writes


def check_disk(where: Path, need: int, what: str = "the dataset") -> None:
    """Raise if the existing directory ``where`` has less than ``need`` bytes free.

    Args:
        where: an existing directory on the target file system.
        need: bytes about to be written.
        what: what needs them, for the message.

    Raises:
        RenderError: too little free space (the message says how to fix it).
    """
    free = shutil.disk_usage(where).free
    if need > free:
        raise RenderError(f"{what} needs {need / 1e9:.1f} GB but {where} has {free / 1e9:.1f} GB free: "
                          f"set data.cache_dir (or $METAFX_CACHE) to a larger disk, or lower data.source.seconds or the grid size")


def fsync_path(p: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes its renames durable).

    Args:
        p: an existing file or directory.

    Raises:
        OSError: it cannot be opened.
    """
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` (:func:`tmp_sibling`) to write; renamed over ``path`` when the block ends cleanly.

    Args:
        path: the final file.

    Yields:
        The temporary path (not created). The caller writes and fsyncs it.

    Raises:
        Whatever the block raises; the temporary file is removed then.
    """
    tmp = tmp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically: a fsynced temporary file renamed over ``path``.

    Args:
        path: the final file.
        obj: JSON-serializable.

    Raises:
        OSError, TypeError: the write failed (the temporary file is removed).
    """
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    while buf:
        n = os.pwrite(fd, buf, offset)
        buf, offset = buf[n:], offset + n


class RowWriter:
    """A new float32 ``(rows, T)`` ``.npy`` file written one row at a time with ``os.pwrite``.

    The header is written and the file sized (sparse) by ``np.lib.format.open_memmap``;
    the mapping is dropped at once. :meth:`write` may be called from several threads
    (``os.pwrite`` at distinct offsets). Use as a context manager: on a clean exit the
    file is fsynced; the descriptor is always closed.

    Args:
        path: the file to create (replaced if it exists).
        rows: number of rows.
        num_samples: ``T``, samples per row.
    """

    def __init__(self, path: Path, rows: int, num_samples: int):
        self.path, self.rows, self.num_samples = Path(path), rows, num_samples
        self.row_bytes = num_samples * 4
        mm = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=(rows, num_samples))
        self.offset = int(mm.offset)
        del mm
        self._fd = os.open(self.path, os.O_WRONLY)

    def write(self, j: int, row: np.ndarray | bytes) -> None:
        """Write row ``j`` (safe from several threads at distinct rows).

        Args:
            j: the row index, ``0 <= j < rows``.
            row: a contiguous float32 array of ``T`` samples, or its ``T * 4`` raw bytes.
        """
        buf = memoryview(row).cast("B") if isinstance(row, np.ndarray) else memoryview(row)
        _pwrite_all(self._fd, buf, self.offset + j * self.row_bytes)

    def fsync(self) -> None:
        """Make the rows written so far durable."""
        os.fsync(self._fd)

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self.fsync()
        finally:
            os.close(self._fd)


class RowReader:
    """An existing ``(rows, T)`` ``.npy`` file read one row at a time with ``os.pread`` (never mapped whole).

    Attributes:
        path: the file.
        shape, dtype: from its header.
        offset: bytes of header before row 0.
        row_bytes: bytes per row.

    Raises:
        OSError, ValueError: the file is missing or not a 2-D ``.npy``.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        arr = np.load(self.path, mmap_mode="r")
        self.shape, self.dtype, self.offset = tuple(arr.shape), arr.dtype, int(arr.offset)
        if len(self.shape) != 2:
            raise ValueError(f"{self.path} holds shape {self.shape}, expected (rows, samples)")
        self.row_bytes = self.shape[1] * arr.itemsize
        del arr
        self._fd = os.open(self.path, os.O_RDONLY)

    def _pread(self, n: int, at: int) -> bytes:
        return os.pread(self._fd, n, at)

    def header(self) -> bytes:
        """The bytes before row 0 (the ``.npy`` header)."""
        return self._pread(self.offset, 0)

    def row(self, j: int) -> bytes:
        """Row ``j``'s raw bytes.

        Raises:
            RenderError: the file ends before the row does.
        """
        buf = self._pread(self.row_bytes, self.offset + j * self.row_bytes)
        if len(buf) != self.row_bytes:
            raise RenderError(f"short read in {self.path} (row {j})")
        return buf

    def tail(self, limit: int = 1 << 16) -> bytes:
        """Up to ``limit`` bytes after the last row (none in a well-formed file)."""
        return self._pread(limit, self.offset + self.shape[0] * self.row_bytes)

    def __enter__(self) -> "RowReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        os.close(self._fd)


def copy_rows(src: RowReader, writer: RowWriter, positions: Mapping[int, int], *, digest: bool = False) -> str | None:
    """Copy rows of ``src`` into ``writer``: row ``i`` to row ``positions[i]``; rows not in ``positions`` are skipped.

    Args:
        src: the rows to read (same row length as ``writer``).
        writer: where they go.
        positions: source row -> destination row.
        digest: also hash the whole source file (header, every row, anything after), reading
            the skipped rows too.

    Returns:
        The sha256 hex digest of the source file if ``digest``, else None.

    Raises:
        RenderError: the source file is shorter than its header says.
    """
    hsh = hashlib.sha256(src.header()) if digest else None
    for i in range(src.shape[0]) if digest else sorted(positions):
        buf = src.row(i)
        if hsh is not None:
            hsh.update(buf)
        if i in positions:
            writer.write(positions[i], buf)
    if hsh is None:
        return None
    hsh.update(src.tail())
    return hsh.hexdigest()


def compact_rows(path: Path, keep: list[int]) -> None:
    """Rewrite the ``(rows, T)`` float32 ``.npy`` at ``path`` with only the ``keep`` rows, in that order.

    Streams row by row through a sibling file renamed over ``path`` when complete.

    Args:
        path: the file.
        keep: row indices to keep, ascending.

    Raises:
        RenderError: the file is shorter than its header says.
    """
    new = path.with_name(f"{path.stem}.compact.npy")
    with RowReader(path) as src, RowWriter(new, len(keep), src.shape[1]) as dst:
        copy_rows(src, dst, {i: j for j, i in enumerate(keep)})
    os.replace(new, path)


def read_part(out_dir: str | os.PathLike[str], part: Part, num_samples: int) -> dict[str, Any] | None:
    """The record of a finished part in ``out_dir`` (left by an earlier, interrupted render), if any.

    Args:
        out_dir: the parts directory.
        part: which part.
        num_samples: ``T``, samples per row.

    Returns:
        The part's :func:`render_part` record, or None if the part is missing, incomplete or of another shape.
    """
    out = Path(out_dir)
    try:
        rec = json.loads((out / f"{part.name}.json").read_text(encoding="utf-8"))
        arr = np.load(out / f"{part.name}.npy", mmap_mode="r")
    except (OSError, ValueError):
        return None
    if rec.get("indices") != list(part.indices) or arr.shape != (len(part.indices), num_samples) \
            or arr.dtype != np.float32:
        return None
    return rec


# --------------------------------------------------------------------------- publishing a dataset directory


def build_dataset(cfg: DataConfig, fill: Callable[[Path, dict[str, Any], str], None]) -> RenderResult:
    """Produce ``cfg.cache_dir / <hash>`` atomically: reuse it if complete, else ``fill`` a temporary dir and rename it.

    ``fill(tmp, key, h)`` writes the whole dataset, ``manifest.json`` last, into ``tmp``
    (``<hash>.tmp-<host>-<pid>-<random>`` in the cache). The rename to ``<hash>`` is the
    last step; if ``fill`` raises (or the process is interrupted) ``tmp`` is removed, and a
    killed process leaves only ``tmp``, which is never read. Losing the rename race to
    another renderer of the same hash uses the winner's directory.

    Args:
        cfg: the ``data`` section.
        fill: writes the dataset into ``tmp``, given its :func:`~metafx.data.plan.dataset_key` ``key`` and hash ``h``.

    Returns:
        The complete directory, and whether ``fill`` produced it (False: it was in the cache,
        or another process's rename landed first).

    Raises:
        Whatever ``fill`` raises; SourceError when a folder source is missing.
    """
    cache = Path(cfg.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    key = dataset_key(cfg)
    h = hash_key(key)
    final = cache / h
    if is_complete(final):
        log.info("dataset %s found in the cache; nothing to render", final)
        return RenderResult(final, rendered=False)
    if final.exists():
        if is_complete(final):  # another renderer's complete directory just landed
            return RenderResult(final, rendered=False)
        # never produced by a renderer (they only rename complete dirs): keep it out of the way
        aside = cache / f"{h}.broken-{os.getpid()}-{secrets.token_hex(4)}"
        log.warning("%s exists without %s (not a finished dataset); moved to %s and rendering again", final, MANIFEST, aside)
        os.rename(final, aside)
    clean_stale_tmp(cache)
    tmp = tmp_sibling(final)
    tmp.mkdir()
    rendered = True
    try:
        fill(tmp, key, h)
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_complete(final):
                raise
            log.info("another process finished dataset %s first; using it", final)
            rendered = False
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return RenderResult(final, rendered)


# --------------------------------------------------------------------------- progress


class Progress:
    """A one-line progress report on stderr (a carriage-return line on a terminal, every 10% otherwise).

    Args:
        total: tasks to do.
        label: the line's prefix.
        enabled: False makes :meth:`update` do nothing.
    """

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.enabled = total, label, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.last_decile = -1

    def update(self, done: int) -> None:
        """Report ``done`` of :attr:`total` tasks finished, with elapsed time and an ETA."""
        if not self.enabled:
            return
        now = time.perf_counter()
        el = now - self.t0
        eta = el / done * (self.total - done) if done else float("nan")
        line = f"{self.label}: {done}/{self.total} tasks ({100 * done / self.total:.0f}%), {el:.1f} s, ETA {eta:.1f} s"
        if self.tty:
            if now - self.last > 0.1 or done == self.total:
                sys.stderr.write("\r" + line + ("\n" if done == self.total else ""))
                sys.stderr.flush()
                self.last = now
        else:
            dec = (10 * done) // self.total
            if dec != self.last_decile:
                self.last_decile = dec
                sys.stderr.write(line + "\n")
                sys.stderr.flush()
