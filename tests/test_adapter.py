from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from amptrain.adapter import (
    check_token_range,
    extract_logits,
    next_token_hits,
    next_token_loss,
    probe_vocab,
)
from amptrain.errors import DataError, ModelError

LOGITS = torch.randn(2, 5, 7)


class HFLikeOutput(OrderedDict):
    """Like transformers' ModelOutput: a dict that also has attributes."""

    def __getattr__(self, name):
        return self[name]


class AttrOutput:
    def __init__(self, logits):
        self.logits = logits
        self.loss = None


@pytest.mark.parametrize(
    "outputs",
    [
        LOGITS,
        (LOGITS, torch.zeros(())),
        [LOGITS],
        {"logits": LOGITS, "loss": torch.zeros(())},
        HFLikeOutput(logits=LOGITS),
        AttrOutput(LOGITS),
    ],
    ids=["tensor", "tuple", "list", "mapping", "hf-model-output", "attribute"],
)
def test_extract_logits_from_every_supported_form(outputs):
    assert extract_logits(outputs) is LOGITS


@pytest.mark.parametrize("bad", [None, "text", {"hidden": LOGITS}, (), [1, 2]])
def test_bad_output_names_the_type_and_the_fixes(bad):
    with pytest.raises(ModelError, match=type(bad).__name__) as err:
        extract_logits(bad)
    assert "'logits' key" in str(err.value)
    assert isinstance(err.value, TypeError)


def test_next_token_loss_shifts_and_ignores_padding():
    logits = torch.zeros(1, 4, 3)
    logits[0, 0, 1] = logits[0, 1, 2] = 10.0  # predicts 1 after pos 0, 2 after pos 1
    labels = torch.tensor([[0, 1, 2, -100]])
    loss = next_token_loss(logits, labels)
    assert int(next_token_hits(logits, labels)) == 2
    assert loss.item() < 1e-3  # the padded last target contributes nothing


class WrongShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, ids):
        return torch.zeros(ids.size(0), 10)


def test_probe_rejects_a_wrong_output_shape_naming_source_and_shape():
    with pytest.raises(ModelError, match=r"model mine\.py:Net returned logits of shape \[1, 10\]"):
        probe_vocab(WrongShape(), 8, torch.device("cpu"), "mine.py:Net")


def test_probe_reads_the_vocabulary_from_the_logits(model):
    assert probe_vocab(model, 8, torch.device("cpu"), "tiny") == 32


def test_probe_wraps_a_failing_forward_with_a_hint(model):
    with pytest.raises(ModelError, match="lower --context"):
        probe_vocab(model, 999, torch.device("cpu"), "tiny")


def test_out_of_range_token_names_id_position_and_vocab():
    ids = torch.tensor([[1, 2, 3], [4, 40, 5]])
    with pytest.raises(DataError, match=r"token id 40 at \(row 1, position 1\).*\[0, 32\)"):
        check_token_range(ids, 32, "training data")
    with pytest.raises(DataError, match="token id -1"):
        check_token_range(torch.tensor([[-1]]), 32, "training data")
