"""One TF32 switch that every reader of torch's TF32 state can read, inside it and after it.

torch has two APIs for TF32: the legacy one (`torch.set_float32_matmul_precision`,
`torch.backends.cuda.matmul.allow_tf32`, `torch.backends.cudnn.allow_tf32`) and, from torch
2.9, the `fp32_precision` attributes. Once the new API alone has set a value, the legacy getters
raise "mix of the legacy and new APIs" (torch issue 166387), and inductor, `cudnn.flags()`,
Lightning and amptrain's doctor read the legacy getters. The legacy setters write both layers.

So the switch sets both, consistently: the legacy setters, which write both layers, then the
new attributes explicitly (an inherited generic `torch.backends.fp32_precision` would
otherwise turn "ieee" back into TF32 for convolutions). On exit it restores what each layer
held (the legacy one where its getters could read it on entry). Before torch 2.9 only the
legacy API exists, and only it is touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

_B = torch.backends


@contextlib.contextmanager
def matmul_mode(tf32: bool) -> Iterator[None]:
    """TF32 tensor-core matmuls and convolutions on (`tf32`) or IEEE fp32, restored on exit."""
    legacy_matmul, legacy_cudnn = _read(_legacy_matmul), _read(lambda: _B.cudnn.allow_tf32)
    saved_new = _new_values() if has_new_api() else None
    mode = "tf32" if tf32 else "ieee"
    try:
        torch.set_float32_matmul_precision("high" if tf32 else "highest")  # both layers
        _B.cudnn.allow_tf32 = tf32
        if saved_new is not None:
            _B.cuda.matmul.fp32_precision = mode
            _B.cudnn.conv.fp32_precision = _B.cudnn.rnn.fp32_precision = mode
        yield
    finally:
        if legacy_matmul is not None:
            torch.set_float32_matmul_precision(legacy_matmul)
        if legacy_cudnn is not None:
            _B.cudnn.allow_tf32 = legacy_cudnn
        if saved_new is not None:
            (_B.cuda.matmul.fp32_precision, _B.mkldnn.matmul.fp32_precision,
             _B.cudnn.conv.fp32_precision, _B.cudnn.rnn.fp32_precision) = saved_new  # fmt: skip


def has_new_api() -> bool:
    """True from torch 2.9, which has the `fp32_precision` attributes."""
    return hasattr(_B.cuda.matmul, "fp32_precision")


def flags() -> dict[str, str]:
    """Every TF32 getter of both APIs and what it reads (an error reads as its message)."""
    getters = {
        "torch.get_float32_matmul_precision()": torch.get_float32_matmul_precision,
        "torch.backends.cuda.matmul.allow_tf32": lambda: _B.cuda.matmul.allow_tf32,
        "torch.backends.cudnn.allow_tf32": lambda: _B.cudnn.allow_tf32,
    }
    if has_new_api():
        getters["torch.backends.cuda.matmul.fp32_precision"] = lambda: _B.cuda.matmul.fp32_precision
        getters["torch.backends.cudnn.conv.fp32_precision"] = lambda: _B.cudnn.conv.fp32_precision
    out = {}
    for name, read in getters.items():
        try:
            out[name] = str(read())
        except RuntimeError as exc:
            out[name] = f"error: {str(exc).splitlines()[0]}"
    return out


def _read(getter: Callable[[], object]) -> object:
    try:
        return getter()
    except RuntimeError:  # the caller set the new API alone: its legacy getter refuses to read
        return None


def _legacy_matmul() -> str:
    _B.cuda.matmul.allow_tf32  # noqa: B018 (it raises where the layers disagree)
    return torch.get_float32_matmul_precision()


def _new_values() -> tuple[str, str, str, str]:
    return (_B.cuda.matmul.fp32_precision, _B.mkldnn.matmul.fp32_precision,
            _B.cudnn.conv.fp32_precision, _B.cudnn.rnn.fp32_precision)  # fmt: skip
