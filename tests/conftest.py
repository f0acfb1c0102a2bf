"""Shared fixtures, the ``slow`` marker (``make test-fast`` runs ``-m "not slow"``) and the ``gpu``
marker (tests that need CUDA: skipped without it, never deselected; ``benchmarks/gpu_check.py`` runs
``-m gpu``).

Slow tests are the multi-process ones (training ranks, a killed or signalled child, the demo's
second process: marked where they are defined, or here by the two-rank fixture they use), the
demo's end-to-end runs, and every test that uses a prepared real corpus (marked here, from its
fixtures: the corpora are fetched through package clients and prepared once per session).
"""
from pathlib import Path

import pytest
import torch

from helpers.corpora import prepared

CORPUS_FIXTURES = frozenset({"corpora", "emoji", "tuxpaint", "fashion", "openclipart", "glyphs"})
PROCESS_FIXTURES = frozenset({"step_results"})  # tests/test_train.py: one step on two DeepSpeed ranks


def pytest_configure(config):
    config.addinivalue_line("markers",
                            "slow: multi-process, demo or corpus-preparing test (left out by make test-fast)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one; benchmarks/gpu_check.py)")


def pytest_collection_modifyitems(config, items):
    no_cuda = pytest.mark.skip(reason="needs a CUDA device") if not torch.cuda.is_available() else None
    for item in items:
        if no_cuda is not None and item.get_closest_marker("gpu"):
            item.add_marker(no_cuda)
        uses = set(getattr(item, "fixturenames", ()))
        if (CORPUS_FIXTURES | PROCESS_FIXTURES) & uses:
            item.add_marker(pytest.mark.slow)
        # under pytest-xdist --dist loadgroup (make test): a module's tests stay on one worker (its
        # module fixtures are built once) and so do all the corpus users (the corpora: once a session)
        group = "corpora" if CORPUS_FIXTURES & uses else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module: small problems only lose to threading overhead
    (and suffer most on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# the real demo corpora, prepared once per session (tests/helpers/corpora.py)
@pytest.fixture(scope="session")
def corpora(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("corpora")


@pytest.fixture(scope="session")
def emoji(corpora) -> dict:
    return prepared(corpora, "emoji")


@pytest.fixture(scope="session")
def tuxpaint(corpora) -> dict:
    return prepared(corpora, "tuxpaint")


@pytest.fixture(scope="session")
def fashion(corpora) -> dict:
    return prepared(corpora, "fashion-mnist")


@pytest.fixture(scope="session")
def openclipart(corpora) -> dict:
    return prepared(corpora, "openclipart")


@pytest.fixture(scope="session")
def glyphs(corpora) -> dict:
    return prepared(corpora, "glyphs")
