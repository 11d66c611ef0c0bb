"""The safetensors file of a run's weights, streamed and byte-for-byte reproducible.

The format is safetensors' own: an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range (and `__metadata__`), padded with spaces to 8 bytes, then
the tensors' bytes. safetensors' writer orders the header's metadata through a hash map, so the
same weights gave other bytes on every save; here the header is sorted, and each tensor is
written from its own memory, one after the other, never as one copy of the whole state.
`safetensors.torch.load_file` reads the result (`tests/test_checkpoint_streaming.py`).
"""

from __future__ import annotations

import json
import struct
import sys
from typing import Any, BinaryIO

import torch

DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def write(file: BinaryIO, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write `tensors` (contiguous, on the CPU) and string `metadata` to `file` as safetensors.

    Raises:
        ValueError: For a dtype safetensors has no name for, or a big-endian machine.
    """
    if sys.byteorder != "little":
        raise ValueError("safetensors files are little-endian; this machine is not")
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name]
        if tensor.dtype not in DTYPES:
            raise ValueError(f"{name}: safetensors has no dtype for {tensor.dtype}")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}  # fmt: skip
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    file.write(struct.pack("<Q", len(text)))
    file.write(text)
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        if tensor.numel():
            file.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
