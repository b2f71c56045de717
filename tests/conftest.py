"""Fixtures shared by the test modules: the in-process tokenizers of tests/tiny.py, and the process state (torch
threads, ``OMP_NUM_THREADS``, the global random generators) restored after every test."""

import os
import random

import numpy as np
import pytest
import torch

from tests import tiny


@pytest.fixture(autouse=True)
def restore_threads_and_rng():
    """A test that sets torch's thread count, ``OMP_NUM_THREADS`` or a global seed leaves the next test as it found
    them (torch / numpy / random generators, thread count, the environment variable)."""
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    yield
    torch.set_num_threads(threads)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp
    torch.set_rng_state(states[0])
    np.random.set_state(states[1])
    random.setstate(states[2])


@pytest.fixture(scope="module")
def bert_tok():
    """A WordPiece tokenizer trained on tiny.corpus() (tiny.bert_tokenizer)."""
    return tiny.bert_tokenizer()


@pytest.fixture(scope="module")
def roberta_tok():
    """A byte-level BPE tokenizer trained on tiny.corpus() (tiny.roberta_tokenizer)."""
    return tiny.roberta_tokenizer()
