"""Call a user's model class or factory with the arguments it understands.

The rules, in order:

1. A class with a `get_default_config()` (minGPT's `CfgNode` convention) gets that config,
   with `--model-kwargs` set on it as attributes.
2. A constructor whose one parameter is annotated with a dataclass (nanoGPT's `GPTConfig`),
   or is named `config`/`cfg` with exactly one `*Config` dataclass defined beside it, gets
   that dataclass built from `--model-kwargs`.
3. Anything else is called with `--model-kwargs` as keyword arguments.

`vocab_size` (from the tokenizer) and `block_size` (the context) are filled where the config
or signature has such a field and the user did not give one. A `**kwargs` constructor also
gets `vocab_size`, unless calling it with that name fails, in which case it is called again
without.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any

from torch import nn

from amptrain.errors import ModelError

_CONFIG_PARAM_NAMES = ("config", "cfg", "conf")


def call_constructor(
    factory: object, source: str, kwargs: dict[str, Any], vocab_size: int, context: int | None
) -> nn.Module:
    """Build the model from `factory` following the module's rules.

    Raises:
        ModelError: If `factory` is not callable, refuses the arguments, or returns no module.
    """
    if isinstance(factory, nn.Module):
        return factory
    if not callable(factory):
        raise ModelError(f"{source} is a {type(factory).__name__}, not a class or function")
    fills = {"vocab_size": vocab_size, **({"block_size": context} if context else {})}
    config = _config_object(factory, source, kwargs, fills)
    if config is not None:
        return _checked(_call(factory, source, (config,), {}), source)
    params = _parameters(factory)
    call_kwargs = dict(kwargs)
    for name, value in fills.items():
        if name in params and name not in kwargs:
            call_kwargs[name] = value
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if takes_any and "vocab_size" not in call_kwargs:
        try:
            return _checked(factory(**call_kwargs, vocab_size=vocab_size), source)
        except TypeError as exc:  # a **kwargs that does not take it: call again without
            if "vocab_size" not in str(exc):
                raise _call_error(source, [*call_kwargs, "vocab_size"], exc) from exc
        except Exception as exc:
            raise _call_error(source, [*call_kwargs, "vocab_size"], exc) from exc
    return _checked(_call(factory, source, (), call_kwargs), source)


def _parameters(factory: object) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return {}


def _config_object(factory: object, source: str, kwargs: dict, fills: dict) -> object | None:
    """The config object for a one-config constructor (rules 1 and 2), else None."""
    default_config = getattr(factory, "get_default_config", None)
    if inspect.isclass(factory) and callable(default_config):
        return _fill_attributes(default_config(), source, kwargs, fills)
    config_class = _config_class(factory)
    if config_class is None:
        return None
    names = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise ModelError(
            f"{source} takes a {config_class.__name__}, which has no field {unknown}; its "
            f"fields: {', '.join(sorted(names))}"
        )
    given = {**{k: v for k, v in fills.items() if k in names}, **kwargs}
    try:
        return config_class(**given)
    except Exception as exc:  # the user's dataclass validates its own fields
        raise ModelError(
            f"{config_class.__name__}(**{given}) failed for {source}: {type(exc).__name__}: {exc}"
        ) from exc


def _config_class(factory: object) -> type | None:
    """The dataclass a single-parameter constructor takes, by annotation or by name."""
    params = [p for p in _parameters(factory).values() if p.kind is not p.VAR_KEYWORD]
    if len(params) != 1 or params[0].kind is params[0].VAR_POSITIONAL:
        return None
    (param,) = params
    function = factory.__init__ if inspect.isclass(factory) else factory
    try:
        hint = typing.get_type_hints(function).get(param.name)
    except Exception:  # an annotation that cannot be evaluated: fall back to the name rule
        hint = None
    if inspect.isclass(hint) and dataclasses.is_dataclass(hint):
        return hint
    if param.name not in _CONFIG_PARAM_NAMES or param.annotation is not param.empty:
        return None
    scope = getattr(function, "__globals__", {})
    found = [v for n, v in scope.items() if n.endswith("Config") and _is_dataclass_type(v)]
    return found[0] if len(found) == 1 else None


def _is_dataclass_type(value: object) -> bool:
    return inspect.isclass(value) and dataclasses.is_dataclass(value)


def _fill_attributes(config: object, source: str, kwargs: dict, fills: dict) -> object:
    known = set(vars(config)) if hasattr(config, "__dict__") else set()
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ModelError(
            f"{source}'s default config has no {unknown}; it has: {', '.join(sorted(known))}"
        )
    for name, value in fills.items():
        if name in known and getattr(config, name) is None and name not in kwargs:
            setattr(config, name, value)
    for name, value in kwargs.items():
        setattr(config, name, value)
    return config


def _call(factory: Any, source: str, args: tuple, kwargs: dict) -> object:
    try:
        return factory(*args, **kwargs)
    except Exception as exc:  # the user's constructor: show its error under a short header
        raise _call_error(source, sorted(kwargs) or [type(a).__name__ for a in args], exc) from exc


def _call_error(source: str, names: list[str], exc: Exception) -> ModelError:
    return ModelError(
        f"calling {source} with {names} failed: {type(exc).__name__}: {exc}; "
        "pass its arguments with --model-kwargs '{\"name\": value}'"
    )


def _checked(model: object, source: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ModelError(f"{source} returned a {type(model).__name__}, not a torch nn.Module")
    return model
