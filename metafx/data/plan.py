"""Task planning: which tasks a dataset holds, its content hash, its train/val/test split and its parts.

Nothing here imports ``dawdreamer``: asking where a dataset lives (:func:`dataset_path`)
or how its tasks split costs no Faust compilation and no audio engine.

A *task* is one effect family (a Faust ``.dsp`` file) at one parameter setting (one
point of the family's grid). :func:`plan_tasks` lists every task to render;
:func:`dataset_key` is everything that determines a dataset's content and
:func:`dataset_hash` its 24-hex-character digest, the name of the dataset directory
in the content-addressed cache (:mod:`metafx.data.cache`). Splits are by task,
stratified by family and seeded (:func:`assign_splits`). A distributed render cuts the
plan into :class:`Part` s of consecutive tasks of one family (:func:`plan_parts`).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metafx.config import ConfigError, DataConfig
from metafx.data.sources import source_fingerprint

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the on-disk layout or the rendering procedure changes
UNSTABLE_GAIN = 100.0  # an output peak above this multiple of the input peak (+40 dB) counts as blowing up
SPLITS = ("train", "val", "test")
PARTS_SUFFIX = ".parts"


class RenderError(RuntimeError):
    """Rendering failed (unstable settings with on_unstable: fail, Faust compile error, disk space). The message says how to fix it."""


# --------------------------------------------------------------------------- the task plan


@dataclass(frozen=True)
class PlannedTask:
    """One grid point to render (before dropping unstable ones)."""

    family_index: int
    family: str
    grid_index: int  # position in the family's full grid
    params: dict[str, float]

    @property
    def id(self) -> str:
        """``family:key=value,...``, the task's name in the manifest."""
        return f"{self.family}:" + ",".join(f"{k}={v:g}" for k, v in self.params.items())


def plan_tasks(cfg: DataConfig) -> list[PlannedTask]:
    """Every task to render: each family's grid (duplicates removed), subset to ``max_tasks`` if set.

    The ``max_tasks`` subset is drawn without replacement from a generator seeded by
    ``(data.split_seed, family index)`` and kept in grid order.

    Args:
        cfg: the ``data`` section.

    Returns:
        Tasks ordered by family, then grid position.
    """
    out: list[PlannedTask] = []
    for fi, fam in enumerate(cfg.families):
        grid = fam.grid()
        seen: set[tuple[float, ...]] = set()
        unique: list[tuple[int, dict[str, float]]] = []
        for gi, p in enumerate(grid):
            k = tuple(p.values())
            if k in seen:
                continue
            seen.add(k)
            unique.append((gi, p))
        if len(unique) < len(grid):
            log.warning("family %r: %d duplicate grid points removed (a duplicate could leak a test task into training)",
                        fam.name, len(grid) - len(unique))
        if fam.max_tasks is not None and fam.max_tasks < len(unique):
            rng = np.random.default_rng([cfg.split_seed & 0xFFFFFFFF, fi])
            pick = np.sort(rng.choice(len(unique), size=fam.max_tasks, replace=False))
            unique = [unique[i] for i in pick]
        out.extend(PlannedTask(fi, fam.name, gi, p) for gi, p in unique)
    return out


# --------------------------------------------------------------------------- the content hash


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    """The sha256 hex digest of a file, read in ``chunk``-byte pieces (never whole into memory).

    Args:
        path: the file.
        chunk: bytes per read.

    Returns:
        64 hex characters.

    Raises:
        OSError: the file cannot be read.
    """
    hsh = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                return hsh.hexdigest()
            hsh.update(b)


def versions() -> dict[str, str]:
    """The versions that determine rendered bytes: dawdreamer (read from package metadata, not imported), numpy, format.

    Returns:
        ``{"dawdreamer": ..., "numpy": ..., "format": ...}``.
    """
    return {
        "dawdreamer": importlib.metadata.version("dawdreamer"),
        "numpy": np.__version__,
        "format": str(FORMAT_VERSION),
    }


def dataset_key(cfg: DataConfig) -> dict[str, Any]:
    """Everything that determines a dataset's content (hashed into its directory name).

    Args:
        cfg: the ``data`` section.

    Returns:
        A JSON-serializable mapping: format version, sample rate, source fingerprint, each
        family's .dsp and .lib digests, grid and ``max_tasks``, split settings,
        ``on_unstable``, :data:`UNSTABLE_GAIN` and :func:`versions`.

    Raises:
        SourceError: a folder source is missing or empty.
    """
    fams = []
    for fam in cfg.families:
        libs = {p.name: sha256_file(p) for p in sorted(Path(fam.dsp).parent.glob("*.lib"))}
        fams.append({
            "name": fam.name,
            "dsp_sha256": sha256_file(Path(fam.dsp)),
            "libs": libs,
            "params": [[p.name, list(p.values)] for p in fam.params],
            "max_tasks": fam.max_tasks,
        })
    return {
        "format_version": FORMAT_VERSION,
        "sample_rate": cfg.sample_rate,
        "source": source_fingerprint(cfg.source, cfg.sample_rate),
        "families": fams,
        "val_fraction": cfg.val_fraction,
        "test_fraction": cfg.test_fraction,
        "split_seed": cfg.split_seed,
        "on_unstable": cfg.on_unstable,
        "unstable_gain": UNSTABLE_GAIN,
        "versions": versions(),
    }


def hash_key(key: dict[str, Any]) -> str:
    """The digest of a :func:`dataset_key`: sha256 of its sorted-key JSON, first 24 hex characters.

    Args:
        key: a :func:`dataset_key`.

    Returns:
        24 hex characters (the dataset directory's name).
    """
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def dataset_hash(cfg: DataConfig) -> str:
    """The content hash naming the dataset directory (24 hex characters).

    Args:
        cfg: the ``data`` section.

    Returns:
        ``hash_key(dataset_key(cfg))``.

    Raises:
        SourceError: a folder source is missing or empty.
    """
    return hash_key(dataset_key(cfg))


def dataset_path(cfg: DataConfig) -> Path:
    """Where the dataset for ``cfg`` lives (complete or not).

    Args:
        cfg: the ``data`` section.

    Returns:
        ``cfg.cache_dir / dataset_hash(cfg)``.

    Raises:
        SourceError: a folder source is missing or empty.
    """
    return Path(cfg.cache_dir) / dataset_hash(cfg)


# --------------------------------------------------------------------------- splits


def split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """How many of a family's ``n`` tasks go to val and test (at least one each when its fraction is > 0).

    Args:
        n: tasks of the family.
        val_fraction, test_fraction: split fractions.

    Returns:
        ``(n_val, n_test)``.
    """
    n_test = 0 if test_fraction <= 0 else max(1, int(round(test_fraction * n)))
    n_val = 0 if val_fraction <= 0 else max(1, int(round(val_fraction * n)))
    return n_val, n_test


def check_split_feasible(family: str, n: int, val_fraction: float, test_fraction: float, *, dropped: int | None = None) -> None:
    """Raise if a family with ``n`` tasks cannot give train, val and test at least one task each.

    Args:
        family: name for the message.
        n: number of tasks of the family.
        val_fraction, test_fraction: split fractions (each split gets at least one task when > 0).
        dropped: None before rendering; after rendering, how many unstable tasks were dropped.

    Raises:
        ConfigError: before rendering (``dropped is None``): the grid is too small.
        RenderError: after rendering: too few (stable) tasks remain.
    """
    n_val, n_test = split_counts(n, val_fraction, test_fraction)
    if n - n_val - n_test >= 1:
        return
    need = 1 + (val_fraction > 0) + (test_fraction > 0)
    msg = (f"family {family!r} has {n} task(s) but needs at least {need} for a train/val/test split by task "
           f"(val_fraction = {val_fraction}, test_fraction = {test_fraction} take at least one task each when > 0)")
    if dropped is None:
        raise ConfigError(f"{msg}: add grid points under data.families[...].params, or set data.val_fraction / "
                          f"data.test_fraction to 0")
    raise RenderError(f"{msg}{f' after dropping {dropped} unstable setting(s)' if dropped else ''}: enlarge the "
                      f"family's parameter grid or move it to stable settings")


def check_plan_splits(cfg: DataConfig, planned: list[PlannedTask], unstable: dict[int, str] | None = None) -> None:
    """Check that every family can be split, before rendering or after dropping the ``unstable`` tasks.

    Args:
        cfg: the ``data`` section.
        planned: :func:`plan_tasks` of ``cfg``.
        unstable: None before rendering; after rendering, ``{planned index: reason}`` of the dropped tasks.

    Raises:
        ConfigError: before rendering: a family's grid is too small.
        RenderError: after rendering: too few stable tasks remain in a family.
    """
    for fi, fam in enumerate(cfg.families):
        if unstable is None:
            check_split_feasible(fam.name, sum(t.family_index == fi for t in planned), cfg.val_fraction,
                                 cfg.test_fraction)
            continue
        n_fam = sum(t.family_index == fi for i, t in enumerate(planned) if i not in unstable)
        dropped_fam = sum(planned[i].family_index == fi for i in unstable)
        check_split_feasible(fam.name, n_fam, cfg.val_fraction, cfg.test_fraction, dropped=dropped_fam)


def assign_splits(families: list[str], val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """Split tasks by task, stratified by family: every split gets tasks of every family.

    Args:
        families: family name of each task (in task order).
        val_fraction, test_fraction: fraction of each family's tasks; at least one task when > 0.
        seed: split seed; the shuffle of family ``j`` (in order of first appearance) uses ``(seed, j)``.

    Returns:
        ``"train" | "val" | "test"`` per task.

    Raises:
        RenderError: a family has too few tasks for the split.
    """
    labels = [""] * len(families)
    order = list(dict.fromkeys(families))
    for j, fam in enumerate(order):
        idx = [i for i, f in enumerate(families) if f == fam]
        check_split_feasible(fam, len(idx), val_fraction, test_fraction, dropped=0)
        n_val, n_test = split_counts(len(idx), val_fraction, test_fraction)
        perm = np.random.default_rng([seed & 0xFFFFFFFF, j]).permutation(len(idx))
        for r, p in enumerate(perm):
            labels[idx[p]] = "test" if r < n_test else "val" if r < n_test + n_val else "train"
    return labels


# --------------------------------------------------------------------------- parts (rendering spread over processes / nodes)


@dataclass(frozen=True)
class Part:
    """Consecutive planned tasks of one family, rendered by one process."""

    family_index: int
    family: str
    indices: tuple[int, ...]  # indices into plan_tasks(cfg), ascending

    @property
    def name(self) -> str:
        """``part-f<family>-<first>-<last>``: the part's file stem in the parts directory."""
        return f"part-f{self.family_index:03d}-{self.indices[0]:06d}-{self.indices[-1]:06d}"


def parts_dir(cfg: DataConfig, h: str | None = None) -> Path:
    """Where the parts of a distributed render of ``cfg`` go.

    Args:
        cfg: the ``data`` section.
        h: the dataset hash, if already computed (else :func:`dataset_hash` of ``cfg``).

    Returns:
        ``<cache_dir>/<hash>.parts``.
    """
    return Path(cfg.cache_dir) / f"{h or dataset_hash(cfg)}{PARTS_SUFFIX}"


def plan_parts(planned: list[PlannedTask], tasks_per_part: int) -> list[Part]:
    """Split the planned tasks into parts of at most ``tasks_per_part`` tasks of one family each.

    Args:
        planned: :func:`plan_tasks` of the configuration.
        tasks_per_part: the most tasks in one part.

    Returns:
        Parts in task order.

    Raises:
        ValueError: ``tasks_per_part < 1``.
    """
    if tasks_per_part < 1:
        raise ValueError(f"tasks_per_part must be >= 1, got {tasks_per_part}")
    parts = []
    for fi in sorted({t.family_index for t in planned}):
        idx = [i for i, t in enumerate(planned) if t.family_index == fi]
        for s in range(0, len(idx), tasks_per_part):
            chunk = tuple(idx[s:s + tasks_per_part])
            parts.append(Part(fi, planned[chunk[0]].family, chunk))
    return parts
