"""Fixtures shared by the test modules: the in-process tokenizers of tests/tiny.py."""

import pytest

from tests import tiny


@pytest.fixture(scope="module")
def bert_tok():
    """A WordPiece tokenizer trained on tiny.corpus() (tiny.bert_tokenizer)."""
    return tiny.bert_tokenizer()


@pytest.fixture(scope="module")
def roberta_tok():
    """A byte-level BPE tokenizer trained on tiny.corpus() (tiny.roberta_tokenizer)."""
    return tiny.roberta_tokenizer()
