"""The record of `auto` precision decisions, one per device, so a busy machine cannot flip them.

`auto` decides from a matmul probe, and a probe on a loaded machine can misread a precision's
speed: two identical runs could then train in different precisions. So the first decision on
a device is recorded and later `auto`s keep it, with a warning whenever their own probe would
choose otherwise, saying whether that probe is unreliable (its rounds disagree, see
`Capabilities.unreliable`) and how to decide again.

The record is `precision.json` in amptrain's cache folder (see `amptrain.cache`). It is keyed
by the device (type, name, hints, compute capability), the thread count, the torch version and
the probe's method, and not by the model, since the decision reads the device's matmul table
alone. It is written whole and renamed into place, so a crash never leaves half of it; a
missing, unreadable or unwritable record is only a record fewer.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import torch

from amptrain.cache import cache_dir, read_entries, write_entries
from amptrain.capability import METHOD, Capabilities

FILE_NAME = "precision.json"


def device_key(caps: Capabilities) -> str:
    """What a decision belongs to: the device, its threads, the torch version, the probe method.

    The probe's method is part of the key, so a decision made by an earlier (wrong) probe is
    never kept.
    """
    cc = "" if caps.compute_capability is None else " sm_{}{}".format(*caps.compute_capability)
    return (
        f"{caps.device_type}: {caps.name}{cc} ({', '.join(caps.hints) or 'no hints'}), "
        f"{caps.threads} threads, torch {torch.__version__}, probe v{METHOD}"
    )


def recorded(caps: Capabilities) -> dict[str, Any] | None:
    """The decision recorded for this device, or None."""
    entry = read_entries(FILE_NAME).get(device_key(caps))
    ok = isinstance(entry, dict) and isinstance(entry.get("precision"), str)
    return entry if ok else None


def record(caps: Capabilities, precision: str, reason: str, reliable: bool) -> None:
    """Record `precision` as this device's decision (atomically; a failure is only logged)."""
    entries = read_entries(FILE_NAME)
    entries[device_key(caps)] = {
        "precision": precision, "reason": reason, "reliable": reliable,
        "when": dt.datetime.now().isoformat(timespec="seconds"),
    }  # fmt: skip
    write_entries(FILE_NAME, entries)


def settle(caps: Capabilities, candidate: str, name: str, reason: str) -> tuple[str, str, str]:
    """`auto`'s final precision, reason and warning ("" if none), given the probe's decision.

    The recorded decision stands; without one (or with one `auto` could not have made here,
    from an edited file), the probe's decision is recorded. Whenever the probe would choose
    otherwise than what is kept, the warning says so and whether the probe is unreliable; an
    unreliable probe is also named in the reason.

    Args:
        caps: The probe's table.
        candidate: The lower precision the decision weighed against fp32.
        name: The probe's decision.
        reason: Its reason.
    """
    doubt, before = caps.unreliable(candidate), recorded(caps)
    if before is not None and before["precision"] not in ("fp32", candidate):
        before = None
    if doubt:
        reason = f"{reason}; unreliable: {doubt}"
    if before is None:
        record(caps, name, reason, reliable=not doubt)
        if doubt:
            return name, reason, (
                f"the precision probe is unreliable now ({doubt}); chose {name} from its best "
                "figures and recorded it for the next runs; --precision fixes the choice"
            )  # fmt: skip
        return name, reason, ""
    kept, when = before["precision"], before.get("when", "earlier")
    if kept == name:
        return name, reason, ""
    why = f"this probe is unreliable ({doubt})" if doubt else (
        f"this probe reads {caps.figures(candidate)}")  # fmt: skip
    return kept, f"auto: {kept}, as decided for this device on {when}", (
        f"auto keeps {kept}, decided for this device on {when}, where {why} and would choose "
        f"{name}; pass --precision {name} to train in it, or delete {cache_dir() / FILE_NAME} "
        "to decide again"
    )  # fmt: skip
