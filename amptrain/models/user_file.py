"""Import a user's model file the way `python file.py` would see it.

The file's folder is first on `sys.path` while it runs, so `from model import GPT` (a
`model.py` beside it) and `from mingpt.model import GPT` (a package beside it) work as they
do for a script. The path is restored afterwards and the sibling modules are taken out of
`sys.modules` again, so two model files that each import their own `model.py` do not see each
other's. A sibling that has the name of a module Python already knows (an installed package,
the standard library) is reported: the file would get one of the two without saying which.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from amptrain.errors import ModelError

log = logging.getLogger("amptrain")
_ANNOUNCED: set[tuple[Path, str]] = set()  # (path, sha256) of the files already announced


def reset() -> None:
    """Forget which model files were announced, so the next import logs its path again."""
    _ANNOUNCED.clear()


def import_symbol(path: Path, symbol: str | None) -> object:
    """Import `path` and return its `symbol`; log the resolved path and sha256 first.

    Raises:
        FileNotFoundError: If the file does not exist.
        ModelError: If importing fails, or `symbol` is missing or None; the message lists the
            classes and functions the file defines.
    """
    path = path.expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    # A search or compare imports the file once per trial or seed: say so once per process.
    first = (path, digest) not in _ANNOUNCED
    _ANNOUNCED.add((path, digest))
    if first:
        log.info("importing model file %s (sha256 %s); it runs with your privileges", path, digest)
    clashes = name_clashes(path.parent)
    for name, other in clashes.items() if first else ():
        log.warning(
            "%s/%s has the name of the installed module %s (%s); `import %s` in the model file "
            "gets only one of them: rename the local one", path.parent, name, name, other, name,
        )  # fmt: skip
    module_name = f"amptrain_user_model_{digest[:12]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        with _importable(path.parent):
            spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        clash = f"; {', '.join(clashes)} beside it clash with installed modules" if clashes else ""
        raise ModelError(
            f"importing model file {path} failed: {type(exc).__name__}: {exc} "
            f"(the traceback above is from that file){clash}"
        ) from exc
    if symbol is None or not hasattr(module, symbol):
        found = ", ".join(candidates(module)) or "none"
        if symbol is None:
            raise ModelError(
                f"--model {path} names no class or function: use {path}:Name, where Name is "
                f"one of: {found}"
            )
        raise ModelError(
            f"model file {path} has no symbol {symbol!r}; nn.Module classes and functions there: "
            f"{found}"
        )
    return getattr(module, symbol)


def candidates(module: object) -> list[str]:
    """The names a model can come from.

    These are the nn.Module classes not from torch itself and the public functions defined
    in `module`.
    """
    own = getattr(module, "__name__", None)
    return sorted(name for name, value in vars(module).items() if _is_model_like(value, own))


def _is_model_like(value: object, own: str | None) -> bool:
    origin = getattr(value, "__module__", None) or ""
    if inspect.isclass(value) and issubclass(value, nn.Module):
        return not origin.startswith("torch.")
    return inspect.isfunction(value) and not value.__name__.startswith("_") and origin == own


def name_clashes(folder: Path) -> dict[str, str]:
    """Sibling modules and packages of `folder` whose names Python already resolves elsewhere."""
    clashes = {}
    for name in sorted(_sibling_modules(folder)):
        if name in sys.stdlib_module_names:
            clashes[name] = "standard library"
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        origin = getattr(spec, "origin", None) or ""
        if spec is not None and not Path(origin).resolve().is_relative_to(folder):
            clashes[name] = origin or "built in"
    return clashes


def _sibling_modules(folder: Path) -> set[str]:
    names = {p.stem for p in folder.glob("*.py")}
    names |= {p.parent.name for p in folder.glob("*/__init__.py")}
    return {n for n in names if n.isidentifier()}


@contextlib.contextmanager
def _importable(folder: Path) -> Iterator[None]:
    """`folder` first on sys.path; afterwards the path and the modules loaded from it go."""
    before = set(sys.modules)
    sys.path.insert(0, str(folder))
    importlib.invalidate_caches()  # files written since the last import must be seen
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(folder))
        for name in set(sys.modules) - before:
            origin = getattr(sys.modules[name], "__file__", None) or ""
            if origin and Path(origin).resolve().is_relative_to(folder):
                del sys.modules[name]
