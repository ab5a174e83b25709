"""Style rules that code review alone kept missing: each heavy dependency imported in the one module named for it.

DESIGN.md "Style" 1: one concept per module, each heavy dependency imported in exactly one module,
so a dependency's version quirks, its start-up cost and its failure modes stay in one place (and
a trial that needs none of it never pays for it). The imports are read from the source (``ast``:
module-level and lazy, inside functions, alike), so the rule holds for every code path, not only
the ones a test happens to import.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Each heavy dependency -> the modules (repository-relative) allowed to import it, and why.
HOMES: dict[str, tuple[str, ...]] = {
    "dawdreamer": ("metafx/data/render.py",),  # rendering Faust code
    "mlflow": ("metafx/tracking.py",),  # the tracking store and the Model Registry
    "optuna": ("metafx/search_space.py",),  # the sampled space, the summary study, Optuna's logging
    "auraloss": ("metafx/metrics.py",),  # the STFT losses
    "higher": ("metafx/engines/maml.py",),  # second-order MAML through a functional copy
    "threadpoolctl": ("metafx/blas_threads.py",),  # one BLAS thread for work spread on threads
    "yaml": ("metafx/config_io.py",),  # study files
    "matplotlib": ("metafx/plots.py",),  # every figure
    # Ray: core in cluster.py (start, join, leave, resources), Tune in the search driver, tasks in the
    # distributed renderer, actors and the object store in the benchmark that measures them.
    "ray": ("metafx/cluster.py", "metafx/search.py", "metafx/data/distributed.py", "metafx/bench/sharing.py"),
}


def _imported_packages(path: Path) -> set[str]:
    """The top-level packages a source file imports anywhere in it (``import a.b`` and ``from a.b import c`` -> ``a``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def _sources() -> list[Path]:
    return sorted(p for d in ("metafx", "launch") for p in (REPO / d).rglob("*.py") if "__pycache__" not in p.parts)


def test_the_import_reader_sees_lazy_and_from_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os.path\n\ndef f():\n    from optuna.distributions import X\n    import ray.tune as t\n"
                   "from . import sibling\n")
    assert _imported_packages(src) == {"os", "optuna", "ray"}


@pytest.mark.parametrize("package", sorted(HOMES))
def test_each_heavy_dependency_is_imported_only_in_its_home(package):
    importers = {str(p.relative_to(REPO)) for p in _sources() if package in _imported_packages(p)}
    strays = sorted(importers - set(HOMES[package]))
    assert not strays, f"{package} imported outside {HOMES[package]}: {strays}; go through the home module's API"
    assert importers, f"no module imports {package}: {HOMES[package]} moved? update HOMES"
