"""Activation checkpointing: in fp32 bit for bit the run without it, each mode; the blocks' own
forward back after the run; less memory; the compiled checkpointed step below the eager step
without checkpointing (torch 2.13's trap); refusals in one line."""

from __future__ import annotations

import pytest
import torch
from conftest import pattern_blocks, tiny_model
from torch import nn

import amptrain
from amptrain import recompute
from amptrain.errors import ConfigError

MODES = ["none", "full", "every:2", "selective"]


def _fit(mode: str, precision: str = "fp32", **extra):
    model = tiny_model(n_layer=4, dropout=0.1)  # dropout: the recompute replays the generators
    result = amptrain.fit(model, pattern_blocks(48), pattern_blocks(16, seed=1),
                          precision=precision, max_steps=4, batch_size=8, lr=1e-2, eval_every=4,
                          eval_batches=1, compile=False, activation_checkpointing=mode,
                          **extra)  # fmt: skip
    return model, result


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_mode_trains_bit_for_bit_as_without_it(precision):
    reference, _ = _fit("none", precision)
    for mode in MODES[1:]:
        model, result = _fit(mode, precision)
        for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
            assert torch.equal(a, b), (mode, name)
        assert result.fast_path["activation_checkpointing"] == mode
        assert "forward" not in vars(model.blocks[0])  # the block's own forward again


def test_the_modes_choose_their_blocks():
    model = tiny_model(n_layer=5)
    applied = recompute.apply(model, "every:2")
    assert applied.record["checkpointed_blocks"] == "3 of 5"  # blocks 0, 2 and 4
    assert [("forward" in vars(b)) for b in model.blocks] == [True, False, True, False, True]
    applied.undo()
    assert not any("forward" in vars(b) for b in model.blocks)
    assert recompute.apply(model, "full").record["checkpointed_blocks"] == "5 of 5"


PEAK = """
import sys, torch, amptrain
from conftest import pattern_blocks, tiny_model
from amptrain.hardware import peak_memory_mb, reset_peak_memory
mode, compile = sys.argv[1], sys.argv[2] == "compile"
torch.manual_seed(0)
model = tiny_model(n_layer=6, n_embd=64, n_head=4, block_size=256)
train, val = pattern_blocks(64, context=256), pattern_blocks(8, 256, seed=1)
before = reset_peak_memory(torch.device("cpu"), return_freed=True)
amptrain.fit(model, train, val, precision="fp32", max_steps=2, batch_size=32, eval_every=2,
             eval_batches=1, compile=compile, activation_checkpointing=mode, allocator="system")
print(peak_memory_mb(torch.device("cpu"))[0] - before)
"""


def _peak(mode: str, compile: bool) -> float:
    """The peak memory increment of a short activation-bound run, in a fresh process.

    Not a forked worker (`hardware.measure_memory`): a fork of a test worker that other tests
    left with threads can inherit a held lock, and compiling in it then waits forever.
    """
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", PEAK, mode, "compile" if compile else "eager"],
                          cwd=Path(__file__).parent, capture_output=True, text=True,
                          timeout=600, check=True)  # fmt: skip
    return float(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_checkpointing_lowers_the_peak_eager_and_compiled():
    eager_none, eager_full = _peak("none", False), _peak("full", False)
    compiled_full = _peak("full", True)
    assert eager_full < 0.8 * eager_none, (eager_full, eager_none)
    assert compiled_full < eager_none, (compiled_full, eager_none)  # torch 2.13: 2.3x in #193193


def test_a_mode_that_cannot_apply_is_refused_before_any_work():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(32, 8), nn.Linear(8, 32)

        def forward(self, ids):
            return self.head(self.emb(ids))

    with pytest.raises(ConfigError, match="no stack of repeated blocks"):
        amptrain.fit(Flat(), pattern_blocks(16), pattern_blocks(8), precision="fp32",
                     max_steps=1, batch_size=4, activation_checkpointing="full")  # fmt: skip
    for bad in ("every:0", "some", "every:x"):
        with pytest.raises(ConfigError, match=r"activation_checkpointing=.* is invalid"):
            _fit(bad)
