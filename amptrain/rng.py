"""The random generators a run draws from, saved and put back, so a resumed run repeats exactly.

Python's, NumPy's, torch's CPU generator and the CUDA generators, as tensors and plain values
(they load with `weights_only=True`). On CUDA the index of the run's own GPU is kept with them,
so a run resumed on another GPU, or where fewer are visible, draws from the same generator.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

log = logging.getLogger("amptrain")


def state(device: torch.device | None = None) -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, as tensors and plain values.

    Args:
        device: The run's device; on CUDA its index is kept, so a resume on another GPU (or
            with fewer visible) restores the generator the run drew from.
    """
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    saved = {
        "python": [version, list(words), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        saved["cuda"] = torch.cuda.get_rng_state_all()
        if device is not None and device.type == "cuda":
            saved["cuda_device"] = _index(device)
    return saved


def _index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


def _set_cuda(
    saved: list[torch.Tensor], trained_on: int | None, device: torch.device | None
) -> None:
    """Restore the CUDA generator the run drew from into the GPU it trains on now.

    A checkpoint holds one state per GPU visible when it was saved, and the index of the run's
    own. That one goes to this run's GPU, whatever its index. An older checkpoint, without the
    index, restores by position the GPUs visible now; the others are left out with a warning.
    """
    if trained_on is not None and trained_on < len(saved):
        torch.cuda.set_rng_state(saved[trained_on], _index(device or torch.device("cuda")))
        return
    visible = torch.cuda.device_count()
    if len(saved) > visible:
        log.warning("rng.pt holds the CUDA generators of %d GPUs and %d are visible: those of "
                    "cuda:0-%d are restored", len(saved), visible, visible - 1)  # fmt: skip
    for index, generator in enumerate(saved[:visible]):
        torch.cuda.set_rng_state(generator, index)


def restore(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Put back the generator states `state` returned (every source present: the caller checks).

    Args:
        state: What `rng.state` returned.
        device: The device this run trains on (its CUDA generator gets the saved one).
    """
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        _set_cuda(list(state["cuda"]), state.get("cuda_device"), device)
    elif torch.cuda.is_available() and torch.cuda.is_initialized():
        log.warning("rng.pt has no CUDA generator state; CUDA randomness will not repeat exactly")
