"""`fit(compile=True)`: the model compiled in place, its compile time measured apart.

`nn.Module.compile()` compiles the module's forward without wrapping it, so parameter names
and checkpoint keys stay as they are, and DDP wraps the compiled module as any other. The
first forward+backward (where the compilation happens) runs once before training, on one
batch of the training shape, under the step's own autocast and attention backend; its time is
the compile time, reported separately, and training then reuses the compiled graphs (the
training batches all have that shape: the loader drops a last partial batch).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
from torch import nn

from amptrain.adapter import extract_logits
from amptrain.precision import Precision


def compile_in_place(
    model: nn.Module,
    precision: Precision,
    sample: torch.Tensor,
    attention: Callable[[], contextlib.AbstractContextManager],
) -> float:
    """Compile `model` in place and trigger the compilation; return the seconds it took.

    The warm-up pass runs with the random generators forked and leaves no gradients behind,
    so a compiled run sees the same randomness and optimizer state as an uncompiled one.
    """
    start = time.perf_counter()
    model.compile()
    with torch.random.fork_rng(devices=[sample.device] if sample.is_cuda else []):
        with precision.autocast(), attention():
            logits = extract_logits(model(sample))
        logits.float().sum().backward()
    model.zero_grad(set_to_none=True)
    if sample.is_cuda:
        torch.cuda.synchronize(sample.device)
    return time.perf_counter() - start
