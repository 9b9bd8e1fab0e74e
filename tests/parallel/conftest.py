"""Fixtures of the worker-pool tests: one local Ray with 2 CPUs per test session, a pool of two
1-thread workers on it (made again when a test closed it), and the tiny model the stages share."""

from __future__ import annotations

import logging
import os

import pytest

from conftest import TINY_VARIANTS, make_tiny_model

ray = pytest.importorskip("ray", reason="the worker-pool tests need Ray: pip install 'pmet-lens[ray]'")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray with 2 CPUs for the whole session (started once: ~4 s), shut down at its end."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def _pool_holder(ray_cluster):
    holder: dict = {}
    yield holder
    if holder.get("pool") is not None:
        holder["pool"].close()


@pytest.fixture
def pool(_pool_holder):
    """Two workers x 1 thread on the session's Ray; a test that closes it gets a fresh one next time."""
    from pmet_lens.parallel import Workers

    current = _pool_holder.get("pool")
    if current is None or current.closed:
        _pool_holder["pool"] = current = Workers(2, threads_per_worker=1, start_timeout=120)
    return current


@pytest.fixture(scope="module")
def model():
    """The tiny sequential RMS / gated-MLP model (SmolLM2's layout)."""
    return make_tiny_model(*TINY_VARIANTS["seq-rms-gated"])


@pytest.fixture(scope="module")
def parallel_model():
    """The tiny parallel-block LayerNorm model (GPT-J's layout)."""
    return make_tiny_model(*TINY_VARIANTS["par-ln"], seed=1)
