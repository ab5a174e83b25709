"""Shared fixtures. Keep it small; suites may append their own fixtures."""
from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from metafx.config import load_config  # noqa: E402

# One intra-op thread: tests run beside Ray workers and render threads on 2 cores, and
# oversubscribed OpenMP threads made a 9 s trial take 70 s.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smoke_cfg(tmp_path_factory):
    """lstm.yaml at the smoke budget, with its dataset cache in a temporary directory."""
    cache = tmp_path_factory.mktemp("datasets")
    return load_config("lstm.yaml", "smoke", overrides={"data.cache_dir": str(cache)})
