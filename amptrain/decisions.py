"""The record of `auto` precision decisions, one per device, so a busy machine cannot flip them.

`auto` decides from a matmul probe, and a probe on a loaded machine can misread a precision's
speed: two identical runs could then train in different precisions. So the first decision on
a device is recorded and later `auto`s keep it, with a warning whenever their own probe would
choose otherwise, saying whether that probe is unreliable (its rounds disagree, see
`Capabilities.unreliable`) and how to decide again.

The record is `precision.json` in amptrain's cache folder: `$AMPTRAIN_CACHE_DIR`, else
`$XDG_CACHE_HOME/amptrain`, else `~/.cache/amptrain`. It is keyed by the device (type, name,
hints, compute capability), the thread count and the torch version, and not by the model,
since the decision reads the device's matmul table alone. It is written whole and renamed into
place, so a crash never leaves half of it; a missing, unreadable or unwritable record is only
a record fewer (two processes writing at once may keep one of their entries, never a mix).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from amptrain.capability import Capabilities

log = logging.getLogger("amptrain")

FILE_NAME = "precision.json"


def cache_dir() -> Path:
    """The folder of amptrain's cache (see the module docstring); not created here."""
    if os.environ.get("AMPTRAIN_CACHE_DIR"):
        return Path(os.environ["AMPTRAIN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "amptrain"


def device_key(caps: Capabilities) -> str:
    """What a decision belongs to: the device, its threads and the torch version."""
    cc = "" if caps.compute_capability is None else " sm_{}{}".format(*caps.compute_capability)
    return (
        f"{caps.device_type}: {caps.name}{cc} ({', '.join(caps.hints) or 'no hints'}), "
        f"{caps.threads} threads, torch {torch.__version__}"
    )


def recorded(caps: Capabilities) -> dict[str, Any] | None:
    """The decision recorded for this device, or None."""
    entry = _read().get(device_key(caps))
    ok = isinstance(entry, dict) and isinstance(entry.get("precision"), str)
    return entry if ok else None


def record(caps: Capabilities, precision: str, reason: str, reliable: bool) -> None:
    """Record `precision` as this device's decision (atomically; a failure is only logged)."""
    entries = _read()
    entries[device_key(caps)] = {
        "precision": precision, "reason": reason, "reliable": reliable,
        "when": dt.datetime.now().isoformat(timespec="seconds"),
    }  # fmt: skip
    path = cache_dir() / FILE_NAME
    tmp = path.with_name(f".{FILE_NAME}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600), "w") as f:
            json.dump(entries, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("precision decision not recorded in %s: %s", path, exc)
        with contextlib.suppress(OSError):  # a folder that cannot exist holds no temporary
            tmp.unlink(missing_ok=True)


def _read() -> dict[str, Any]:
    try:
        entries = json.loads((cache_dir() / FILE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


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
