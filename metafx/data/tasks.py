"""Task sets and episodes: the rendered dataset as memory-mapped arrays, sampled into MAML episodes.

A :class:`TaskSet` opens a dataset directory written by
:func:`metafx.data.render.render_taskset` with ``np.load(mmap_mode="r")``: the
arrays are never read into private memory, so every process on a node that opens
the same directory shares one copy through the page cache (this is the
shared-memory design; a TaskSet pickles as its path, so passing it to a Ray
worker or a subprocess reopens the mapping instead of copying the arrays).

An :class:`EpisodeSampler` draws a task of one split and ``k_support + k_query``
non-overlapping slices at the same positions in the input and the task's target
(the paper's episodes), from a seeded numpy Generator. Only the slices are
copied into the episode's tensors.

This module does not import dawdreamer; :func:`load_taskset` imports the
renderer only when it is called.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from metafx.config import DataConfig
from metafx.data.cache import MANIFEST
from metafx.data.plan import SPLITS

log = logging.getLogger(__name__)

SILENCE_DB = -60.0  # a slice whose input RMS is below this (dBFS) is "almost silent" and redrawn
MAX_REDRAWS = 50  # tries per almost-silent slice to find an audible place
SUPPORTED_FORMATS = (1,)


class TaskSetError(RuntimeError):
    """A dataset directory is missing, incomplete or inconsistent. The message says how to fix it."""


class TaskSet:
    """A rendered dataset: one dry input signal and one target signal per task.

    Attributes:
        path: the dataset directory.
        hash: its content hash (the directory name).
        sample_rate: Hz.
        input: float32 read-only memmap, shape ``(T,)``.
        targets: float32 read-only memmap, shape ``(N, T)``; row ``i`` is task ``i``.
        tasks: ``N`` dicts with ``index, id, family, params, split`` (and ``grid_index``).
        manifest: the full ``manifest.json``.
        left_out: families left out of meta-training (see below).

    Splits are by task, stratified by family, as rendered into the manifest. With
    ``left_out`` families (a study's ``data.left_out_families``) the split becomes one by
    family: ``train`` and ``val`` hold no task of a left-out family, and ``test`` holds only
    the test tasks of the left-out families: effects the meta-learner has never seen. The
    same held-out tasks of a family are then the test split whether it is left out or not,
    so in-family and left-out results compare on the same episodes; the left-out families'
    train and val tasks are not used. The rendered dataset is the same either way.

    Args:
        path: the dataset directory.
        left_out: family names to leave out of meta-training.

    Raises:
        TaskSetError: the directory is not a complete dataset of a supported format, or the
            arrays disagree with the manifest.
    """

    def __init__(self, path: str | os.PathLike[str], left_out: Sequence[str] = ()):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise TaskSetError(f"{self.path} is not a complete dataset (no manifest.json): render it with "
                               f"`python launch/render.py --space <study>` or load_taskset(cfg)")
        with open(mpath, encoding="utf-8") as fh:
            self.manifest: dict[str, Any] = json.load(fh)
        fmt = self.manifest.get("format_version")
        if fmt not in SUPPORTED_FORMATS:
            raise TaskSetError(f"{self.path}: dataset format {fmt} is not supported by this metafx "
                               f"(supports {SUPPORTED_FORMATS}); delete the directory and render again")
        self.hash: str = self.manifest["hash"]
        self.sample_rate: int = int(self.manifest["sample_rate"])
        self.tasks: list[dict[str, Any]] = list(self.manifest["tasks"])
        self.input: np.ndarray = np.load(self.path / "input.npy", mmap_mode="r")
        self.targets: np.ndarray = np.load(self.path / "targets.npy", mmap_mode="r")
        T = int(self.manifest["num_samples"])
        if self.input.shape != (T,) or self.targets.shape != (len(self.tasks), T):
            raise TaskSetError(
                f"{self.path}: arrays input {self.input.shape} / targets {self.targets.shape} do not match the manifest "
                f"({len(self.tasks)} tasks x {T} samples); delete the directory and render again"
            )
        self.left_out: tuple[str, ...] = tuple(left_out)
        unknown = sorted(set(self.left_out) - set(self.families))
        if unknown:
            raise TaskSetError(f"{self.path}: left-out families {unknown} are not in this dataset (families: "
                               f"{', '.join(self.families)}); name families of the study's data.families")
        if self.left_out and set(self.left_out) == set(self.families):
            raise TaskSetError(f"{self.path}: every family is left out of meta-training; leave at least one in")
        out = set(self.left_out)
        self._splits = {s: [t["index"] for t in self.tasks if t["split"] == s and
                            ((t["family"] in out) == (s == "test") if out else True)] for s in SPLITS}

    # Pickle as the path and the left-out families: the receiving process maps the same files
    # (one copy per node), never the arrays.
    def __reduce__(self) -> tuple[Any, ...]:
        return (TaskSet, (str(self.path), self.left_out))

    def __len__(self) -> int:
        return len(self.tasks)

    def __repr__(self) -> str:
        counts = ", ".join(f"{s} {len(v)}" for s, v in self._splits.items())
        return f"TaskSet({str(self.path)!r}, {len(self)} tasks ({counts}), {self.seconds:.1f} s at {self.sample_rate} Hz)"

    @property
    def num_samples(self) -> int:
        """``T``, samples per signal."""
        return int(self.input.shape[0])

    @property
    def seconds(self) -> float:
        """Length of every signal in seconds."""
        return self.num_samples / self.sample_rate

    @property
    def families(self) -> list[str]:
        """Family names in manifest order."""
        return [f["name"] for f in self.manifest["families"]]

    def split(self, name: str, family: str | None = None) -> list[int]:
        """Task indices of a split.

        Args:
            name: ``"train"``, ``"val"`` or ``"test"``.
            family: only the tasks of this family.

        Returns:
            Indices into :attr:`tasks` / rows of :attr:`targets` (a new list).

        Raises:
            ValueError: unknown split name.
        """
        if name not in self._splits:
            raise ValueError(f"unknown split {name!r}; allowed: {', '.join(SPLITS)}")
        return [i for i in self._splits[name] if family is None or self.tasks[i]["family"] == family]


def load_taskset(cfg: DataConfig, progress: bool = True) -> TaskSet:
    """Render the dataset for ``cfg`` if it is not cached, then open it (with ``cfg.left_out_families`` left out).

    Args:
        cfg: the ``data`` section of a study config.
        progress: show render progress on stderr.

    Returns:
        The opened :class:`TaskSet` (memory-mapped).

    Raises:
        ConfigError, RenderError, SourceError: see :func:`metafx.data.render.render_taskset`.
    """
    from metafx.data.render import render_taskset  # lazy: only the renderer imports dawdreamer

    return TaskSet(render_taskset(cfg, progress=progress).path, left_out=cfg.left_out_families)


@dataclass
class Episode:
    """One MAML episode: support and query slices of one task.

    Attributes:
        task: index of the task in the TaskSet (row of ``targets``; also :attr:`task_index`).
        task_id: e.g. ``"moog_vcf:cutoff=300,resonance=0.4"``.
        family: effect family name.
        params: the task's parameter setting ``{slider: value}``.
        support_x, support_y: float32 tensors, shape ``(K_support, 1, L)`` (input, target).
        query_x, query_y: float32 tensors, shape ``(K_query, 1, L)``.
        positions: int64 array, shape ``(K_support + K_query,)``: start sample of each slice,
            support slices first, then query slices.
    """

    task: int
    task_id: str
    family: str
    params: dict[str, float]
    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    positions: np.ndarray = field(repr=False)

    @property
    def task_index(self) -> int:
        """Alias of :attr:`task`."""
        return self.task


class EpisodeSampler:
    """Seeded sampler of episodes from one split of a :class:`TaskSet`.

    Args:
        taskset: the task set (its arrays are only read, slice by slice).
        split: ``"train"``, ``"val"`` or ``"test"``.
        k_support: support slices per episode.
        k_query: query slices per episode.
        slice_len: samples per slice ``L``.
        seed: seed of the sampler's numpy Generator: the same seed gives the same
            sequence of episodes from :meth:`sample`.
        family: only the tasks of this family (per-family evaluation).

    Raises:
        ValueError: the split is empty, or ``(k_support + k_query) * slice_len`` exceeds the signal length.
    """

    def __init__(self, taskset: TaskSet, split: str, k_support: int, k_query: int, slice_len: int, seed: int = 0,
                 family: str | None = None):
        if k_support < 1 or k_query < 1 or slice_len < 1:
            raise ValueError(f"k_support ({k_support}), k_query ({k_query}) and slice_len ({slice_len}) must be >= 1")
        self.taskset = taskset
        self.split_name = split
        self.indices = taskset.split(split, family)
        if not self.indices and family is not None:
            raise ValueError(f"split {split!r} of {taskset.path} has no task of family {family!r}")
        if not self.indices:
            sizes = ", ".join(f"{name} {len(taskset.split(name))}" for name in SPLITS)
            raise ValueError(f"split {split!r} of {taskset.path} has no tasks (tasks per split: {sizes}): set "
                             f"data.val_fraction / data.test_fraction > 0 or enlarge the parameter grid")
        self.k_support, self.k_query, self.slice_len = int(k_support), int(k_query), int(slice_len)
        need = (self.k_support + self.k_query) * self.slice_len
        if need > taskset.num_samples:
            raise ValueError(
                f"{self.k_support} + {self.k_query} slices of {self.slice_len} samples need {need} samples but the "
                f"task set has {taskset.num_samples} ({taskset.seconds:.2f} s): lower the slices or render more audio"
            )
        self.rng = np.random.default_rng(seed)
        self._silence_rms = 10.0 ** (SILENCE_DB / 20.0)
        self._warned = False

    def __len__(self) -> int:
        return len(self.indices)

    def sample(self, rng: np.random.Generator | None = None) -> Episode:
        """An episode: a task drawn uniformly from the split, then its slice positions.

        Args:
            rng: generator to draw from; None = the sampler's own generator (seeded by
                ``seed``), which this call advances.

        Returns:
            The :class:`Episode`.
        """
        rng = self.rng if rng is None else rng
        task = self.indices[int(rng.integers(len(self.indices)))]
        return self.episode(task, rng)

    def for_step(self, seed: int, step: int, n: int) -> list[Episode]:
        """The ``n`` episodes of meta-step ``step``: a pure function of ``(seed, step)``.

        The meta-training schedule: a run resumed at any step draws the same episodes as one
        that never stopped. The sampler's own generator is not touched.

        Args:
            seed: the run's seed (``maml.seed``).
            step: the 1-based meta-step.
            n: episodes per meta-step (``maml.meta_batch``).

        Returns:
            ``n`` episodes.
        """
        rng = np.random.default_rng([seed, step])
        return [self.sample(rng) for _ in range(n)]

    def fixed(self, n: int, seed: int) -> list[Episode]:
        """A deterministic list of ``n`` episodes that does not touch the sampler's own generator.

        Tasks are taken from a seeded permutation of the split, cycled, so every task
        appears ``n // len(split)`` or one more times; positions come from the same
        seeded generator. Use it for test episodes that must be identical for every method.

        Args:
            n: number of episodes.
            seed: the list is a function of (task set, split, k's, slice_len, seed) only.

        Returns:
            ``n`` episodes.
        """
        rng = np.random.default_rng(seed)
        order = [self.indices[i] for i in rng.permutation(len(self.indices))]
        return [self.episode(order[j % len(order)], rng) for j in range(n)]

    def positions(self, rng: np.random.Generator) -> np.ndarray:
        """Start samples of ``k_support + k_query`` non-overlapping slices, in random order.

        Uniform over the arrangements: the free samples ``T - K L`` are split into
        ``K + 1`` gaps by ``K`` sorted draws, so slice ``j`` (in time order) starts at
        ``gap_draw_j + j L``; the time-ordered starts are then shuffled so support and
        query slices interleave in time.

        Args:
            rng: generator to draw from.

        Returns:
            int64 array, shape ``(K,)``.
        """
        K, L = self.k_support + self.k_query, self.slice_len
        free = self.taskset.num_samples - K * L
        cuts = np.sort(rng.integers(0, free + 1, size=K))
        starts = cuts + np.arange(K) * L
        return rng.permutation(starts).astype(np.int64)

    def _rms(self, starts: np.ndarray) -> np.ndarray:
        L = self.slice_len
        xs = np.stack([self.taskset.input[p : p + L] for p in starts])  # copies only the slices, (K, L)
        return np.sqrt(np.mean(np.square(xs, dtype=np.float64), axis=1))

    def _audible_positions(self, rng: np.random.Generator) -> np.ndarray:
        """:meth:`positions`, then each almost-silent slice moved to a random audible, non-overlapping place."""
        T, L = self.taskset.num_samples, self.slice_len
        pos = self.positions(rng)
        silent = self._rms(pos) < self._silence_rms
        for j in np.flatnonzero(silent):
            others = np.delete(pos, j)
            for _ in range(MAX_REDRAWS):
                c = int(rng.integers(0, T - L + 1))
                if np.all(np.abs(others - c) >= L) and self._rms(np.array([c]))[0] >= self._silence_rms:
                    pos[j] = c
                    silent[j] = False
                    break
        if silent.any() and not self._warned:
            log.warning("could not avoid almost-silent slices (input RMS < %g dBFS) for %s; the source has long "
                        "silences: shorten them or use longer slices", SILENCE_DB, self.taskset.path)
            self._warned = True
        return pos

    def episode(self, task_index: int, rng: np.random.Generator) -> Episode:
        """An episode of a given task with slice positions drawn from ``rng``.

        An almost-silent slice (input RMS below :data:`SILENCE_DB` dBFS) is moved to a
        random audible place that overlaps no other slice (up to :data:`MAX_REDRAWS`
        tries per slice; if none is found the slice stays and a warning is logged once).

        Args:
            task_index: row of the task (any split).
            rng: generator for the positions.

        Returns:
            The :class:`Episode`; ``support_y``/``query_y`` are the target at exactly the
            positions of ``support_x``/``query_x``.
        """
        ts, L = self.taskset, self.slice_len
        pos = self._audible_positions(rng)
        xs = np.stack([ts.input[p : p + L] for p in pos])  # copies only the slices, (K, L)
        row = ts.targets[task_index]
        ys = np.stack([row[p : p + L] for p in pos])
        x_t = torch.from_numpy(np.ascontiguousarray(xs, dtype=np.float32)).unsqueeze(1)  # (K, 1, L)
        y_t = torch.from_numpy(np.ascontiguousarray(ys, dtype=np.float32)).unsqueeze(1)
        ks = self.k_support
        task = ts.tasks[task_index]
        return Episode(
            task=int(task_index),
            task_id=task["id"],
            family=task["family"],
            params=dict(task["params"]),
            support_x=x_t[:ks],
            support_y=y_t[:ks],
            query_x=x_t[ks:],
            query_y=y_t[ks:],
            positions=pos,
        )
