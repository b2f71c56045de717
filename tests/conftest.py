"""Fixtures shared by the test modules: the in-process tokenizers of tests/tiny.py; the global random generators seeded
for each module and each test, and the process state (torch threads, ``OMP_NUM_THREADS``, the generators) restored
after every test."""

import os
import random

import numpy as np
import pytest
import torch

from tests import tiny
from tests.helpers import thread_count


def _global_random_state():
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def _set_global_random_state(states) -> None:
    torch.set_rng_state(states[0])
    np.random.set_state(states[1])
    random.setstate(states[2])


def _seed_everything(seed: int = 0) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@pytest.fixture(autouse=True, scope="module")
def seeded_module():
    """Each module's fixtures (tiny models, teachers) start from the same global random state whatever ran before,
    so a selection of tests (-k, one file) measures what the full run measures; the state is restored afterwards."""
    states = _global_random_state()
    _seed_everything()
    yield
    _set_global_random_state(states)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny models (faster, and no fight with other processes for the cores), or
    ``$OMP_NUM_THREADS`` where set (docs/testing.md); restored afterwards. A module asks for it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(thread_count())
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def restore_threads_and_rng():
    """Each test starts from seed 0 of the torch / numpy / random global generators, and leaves the next test as it
    found them: generators, torch's thread count and ``OMP_NUM_THREADS`` restored."""
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    states = _global_random_state()
    _seed_everything()
    yield
    torch.set_num_threads(threads)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp
    _set_global_random_state(states)


@pytest.fixture(scope="module")
def bert_tok():
    """A WordPiece tokenizer trained on tiny.corpus() (tiny.bert_tokenizer)."""
    return tiny.bert_tokenizer()


@pytest.fixture(scope="module")
def roberta_tok():
    """A byte-level BPE tokenizer trained on tiny.corpus() (tiny.roberta_tokenizer)."""
    return tiny.roberta_tokenizer()


_GPU_DESELECTED: list[str] = []


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: on a machine without it they are deselected (not skipped one by one), and the
    summary says how many and how to run them (scripts/gpu_tests.sh on a GPU machine; docs/testing.md)."""
    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        _GPU_DESELECTED.extend(item.nodeid for item in gpu)
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


def pytest_terminal_summary(terminalreporter):
    if _GPU_DESELECTED:
        terminalreporter.write_line(
            f"{len(_GPU_DESELECTED)} gpu tests not run: no CUDA device here; scripts/gpu_tests.sh runs them on a GPU "
            "machine (docs/testing.md, 'GPU tests')"
        )
