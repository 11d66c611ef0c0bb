"""The one place that hides secrets: passwords in URLs and keys from the environment.

Every message, file and log line that could carry a storage URL or an API key goes through
`redact` (a URL to show) or `scrub` (any text, with the secrets it may contain).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from urllib.parse import unquote

_USERINFO = r"^([A-Za-z][A-Za-z0-9+.-]*://[^:@/]*:)(.*)@([^@]*)$"
_QUERY = r"(?i)([?&](?:password|passwd|pwd)=)([^&]*)"


def redact(url: str) -> str:
    """`url` with any password shown as `***`: `postgresql://user:***@host/db`.

    The password is everything between the user name's colon and the last `@`, so a password
    with a stray `@` or `/` is hidden whole; `password=`/`pwd=` query values are hidden too.
    File paths come back unchanged.
    """
    text = re.sub(_USERINFO, r"\1***@\3", str(url))
    return re.sub(_QUERY, r"\1***", text)


def url_secrets(url: str) -> list[str]:
    """The secrets `redact` hides in `url`.

    A password written with a stray `@` or `/` is also returned in the pieces between them
    (of 4 characters or more): a driver that splits the URL at the first `@` quotes the rest
    of the password as part of the host name.
    """
    found = re.match(_USERINFO, str(url))
    secrets = []
    if found:
        password = found.group(2)
        secrets += [password, *(p for p in re.split(r"[@/?#]", password) if len(p) >= 4)]
    return secrets + [m.group(2) for m in re.finditer(_QUERY, str(url))]


def quoted_password(url: str) -> str:
    """`url` with `@`, `/`, `?` and `#` in its password percent-encoded, as URLs need them.

    The password is what `redact` hides (up to the last `@`), so `user:p@ss@host` connects as
    the user meant instead of to the host `ss@host`. Other characters are left as written.
    """
    found = re.match(_USERINFO, str(url))
    if found is None:
        return url
    password = re.sub(r"[@/?#]", lambda m: f"%{ord(m.group()):02X}", found.group(2))
    return f"{found.group(1)}{password}@{found.group(3)}"


def env_secrets(*names: str) -> list[str]:
    """The values of these environment variables, where long enough to be keys."""
    return [v for v in (os.environ.get(n, "") for n in names) if len(v) >= 8]


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret (also in its URL-decoded form) replaced by `***`."""
    for secret in filter(None, secrets):
        text = text.replace(secret, "***").replace(unquote(secret), "***")
    return text
