"""Shared fixtures: tiny models and data, deterministic single-threaded CPU runs."""

from __future__ import annotations

import logging

import pytest
import torch

from amptrain.data import Blocks
from amptrain.models import GPTConfig, TinyGPT

VOCAB = 32
CONTEXT = 16


@pytest.fixture(autouse=True)
def _restore_amptrain_logger():
    """The CLI sets up the "amptrain" logger for a terminal; undo it so caplog sees records."""
    logger = logging.getLogger("amptrain")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate, logger.level = saved[0], saved[1], saved[2]


@pytest.fixture(autouse=True)
def _deterministic_cpu():
    dtype = torch.get_default_dtype()
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_model(seed: int = 0, **overrides) -> TinyGPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, n_layer=2, n_embd=16, n_head=2, block_size=CONTEXT)
    return TinyGPT(GPTConfig(**{**cfg, **overrides}))


def pattern_blocks(n: int = 48, context: int = CONTEXT, seed: int = 0) -> Blocks:
    """A learnable task: each row counts up by a row-specific stride modulo VOCAB."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    ids = (start + stride * torch.arange(context)) % VOCAB
    return Blocks(ids, ids.clone(), "pattern")


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture
def train_val():
    return pattern_blocks(48, seed=0), pattern_blocks(16, seed=1)
