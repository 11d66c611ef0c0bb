"""Settings files in JSON, YAML or TOML, chosen by suffix and read into plain Python values.

`--config` files and search spaces are read here, so every settings file takes the same three
formats and is refused alike: one line naming the file, the line and what is wrong.

YAML is read with PyYAML's safe loader, with two changes a settings file needs: `1e-3` is a
number (YAML 1.1 reads it as a string, so `lr: 1e-3` would be refused as text), and aliases
are refused (`&a`/`*a` expand a small file into a huge one, and settings never need them).
TOML is read with the standard library's `tomllib` (Python 3.11+; `tomli` on 3.10).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from amptrain.errors import ConfigError

FORMATS = "JSON (.json), YAML (.yaml, .yml) or TOML (.toml)"

_MAX_BYTES = 1 << 20  # a settings file is a few hundred bytes; a megabyte is not one


def format_of(path: Path) -> str:
    """`yaml`, `toml` or `json`, by the file's suffix (any other suffix is read as JSON)."""
    suffix = path.suffix.lower()
    return "yaml" if suffix in (".yaml", ".yml") else "toml" if suffix == ".toml" else "json"


def read(path: Path, what: str) -> Any:
    """The values a settings file holds, whatever they are (the caller checks their shape).

    Args:
        path: The file; its suffix names its format (`format_of`).
        what: How messages name the file, for example `--config settings.yaml`.

    Raises:
        ConfigError: One line naming `what`: unreadable, too large, or not valid in its format
            (with the line and column where the parser gives them).
    """
    try:
        if path.stat().st_size > _MAX_BYTES:
            raise ConfigError(f"{what}: {path.stat().st_size:,} bytes is not a settings file "
                              f"(the limit is {_MAX_BYTES:,}); name the settings file")  # fmt: skip
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what}: cannot read it ({exc})") from None
    kind = format_of(path)
    try:
        return {"yaml": _yaml, "toml": _toml, "json": _json}[kind](text, what)
    except RecursionError:
        raise ConfigError(f"{what}: nested deeper than Python reads; settings are a level or "
                          "two deep") from None  # fmt: skip


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what}: not valid JSON at line {exc.lineno}, column {exc.colno}: "
                          f"{exc.msg}") from None  # fmt: skip


def _toml(text: str, what: str) -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what}: not valid TOML ({exc})") from None


def _yaml(text: str, what: str) -> Any:
    import yaml

    try:
        return yaml.load(text, Loader=_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{what}: not valid YAML{where}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what}: not valid YAML ({exc})") from None


_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


def _loader() -> type:
    """PyYAML's SafeLoader, reading `1e-3` as a number and refusing aliases."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.MarkedYAMLError(
                    None, None, "an alias (*name): write the value out, settings need none",
                    event.start_mark,
                )  # fmt: skip
            return super().compose_node(parent, index)

    Loader.yaml_implicit_resolvers = {
        first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:float"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
    return Loader
