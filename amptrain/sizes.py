"""Sizes of memory as people write them: `16GiB`, `12GB`, `800MiB`."""

from __future__ import annotations

import math
import re

from amptrain.errors import ConfigError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}  # fmt: skip


def parse_size(text: str | int) -> int:
    """Bytes of a size such as `16GiB`, `12GB`, `800MiB` or `1e9`.

    Raises:
        ConfigError: Naming the text and the forms it takes.
    """
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if match and match.group(2) in _UNITS:
        try:
            size = float(match.group(1)) * _UNITS[match.group(2)]
        except ValueError:
            size = 0.0
        if math.isfinite(size) and size >= 1:
            return int(size)
    raise ConfigError(f"memory_budget={text!r} is not a size: give bytes with a unit, e.g. "
                      "16GiB, 12GB or 800MiB")  # fmt: skip
