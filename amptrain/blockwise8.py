"""Blockwise 8-bit AdamW moments in bitsandbytes' format, with blocks that never cross a row.

bitsandbytes' 8-bit optimizers keep each moment as 8-bit codes on a dynamic map (signed for
the first moment, unsigned for the second) and one absolute maximum per block of 256 values.
amptrain keeps the same format with bitsandbytes' own quantization functions, blocks of 256
values where a row holds a multiple of 256, else 128 or 64, so that a shard of whole rows
(FSDP2) holds whole blocks and quantizes them as one process does; the maxima are stored as
(rows, blocks a row). Tensors under `MIN_8BIT_SIZE` elements, 1-d ones, and rows that no block
divides keep 16- or 32-bit moments.
"""

from __future__ import annotations

import torch

MIN_8BIT_SIZE = 4096
"""Smaller tensors keep 16/32-bit moments (bitsandbytes' threshold)."""
BLOCKS = (256, 128, 64)
"""Values per absolute maximum, the first that divides a row: 256 is bitsandbytes' 8-bit
optimizers' block."""


def block_of(param: torch.Tensor) -> int | None:
    """The block of `param`'s 8-bit moments, or None where they stay 16/32-bit."""
    if param.numel() < MIN_8BIT_SIZE or param.dim() < 2:
        return None
    row = param.numel() // param.shape[0]
    return next((size for size in BLOCKS if row % size == 0), None)


class Codec:
    """bitsandbytes' blockwise 8-bit quantization of a moment, on its dynamic maps."""

    def __init__(self) -> None:
        import bitsandbytes.functional as bnb

        self.bnb = bnb
        self.maps: dict[tuple[bool, torch.device], torch.Tensor] = {}

    def _map(self, signed: bool, device: torch.device) -> torch.Tensor:
        if (signed, device) not in self.maps:
            self.maps[signed, device] = self.bnb.create_dynamic_map(signed=signed).to(device)
        return self.maps[signed, device]

    def decode(self, state: dict, name: str, block: int, signed: bool) -> torch.Tensor:
        """The fp32 values of moment `name` (its codes and `name + "_absmax"` in `state`)."""
        codes = state[name]
        absmax = state[name + "_absmax"].view(-1)
        flat = self.bnb.dequantize_blockwise(codes.view(-1), absmax=absmax,
                                             code=self._map(signed, codes.device),
                                             blocksize=block)  # fmt: skip
        return flat.view(codes.shape)

    def encode(self, state: dict, name: str, value: torch.Tensor, block: int, signed: bool) -> None:
        """Quantize fp32 `value` into moment `name`'s codes and maxima in `state`, in place."""
        self.bnb.quantize_blockwise(value.reshape(-1), code=self._map(signed, value.device),
                                    absmax=state[name + "_absmax"].view(-1),
                                    out=state[name].view(-1), blocksize=block)  # fmt: skip
