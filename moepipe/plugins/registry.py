"""Find a plug-in by name: placers, forecasters, workloads, schedules and MoE backends.

A name resolves, in this order, to
  1. something registered in this process with `@register(kind, name)` (a user's own code),
  2. a built-in (moepipe.plugins.builtins),
  3. an import path "pkg.module:attr" given in the config (placer.name=mypkg.placers:greedy),
  4. an installed package's entry point in group `moepipe.<kind>` (importlib.metadata),
  5. a dotted path as Hydra's `_target_` writes it (placer.name=mypkg.placers.greedy), found by
     Hydra's own locator (hydra.utils.get_object).
Nothing is imported until a name is resolved, and a resolved name is cached.
"""
from __future__ import annotations

import importlib
from importlib import metadata
from typing import Any, Callable

from moepipe.plugins.builtins import BUILTINS, KINDS

# The config field naming each kind: what a one-line error points the user at.
FIELDS = {"placer": "placer.name", "forecaster": "placer.forecast", "workload": "workload.kind",
          "schedule": "schedule.name", "moe_backend": "moe.backend"}

_registered: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
_resolved: dict[tuple[str, str], Any] = {}


def _config_error(message: str) -> Exception:
    from moepipe.config import ConfigError  # moepipe.config imports this package: import late

    return ConfigError(message)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise _config_error(f"plug-in kind={kind!r} is not known: choose one of {', '.join(KINDS)}")


def register(kind: str, name: str) -> Callable[[Any], Any]:
    """Decorator: `@register("placer", "greedy")` makes `placer.name=greedy` find the function
    (the module defining it must have been imported, e.g. by the script that runs moepipe)."""
    _check_kind(kind)

    def add(obj: Any) -> Any:
        _registered[kind][name] = obj
        _resolved.pop((kind, name), None)
        return obj

    return add


def unregister(kind: str, name: str) -> None:
    """Forget a name added with `register` (tests, notebooks)."""
    _registered[kind].pop(name, None)
    _resolved.pop((kind, name), None)


def entry_point_names(kind: str) -> tuple[str, ...]:
    """Names installed packages add in group `moepipe.<kind>` (reads metadata, imports nothing)."""
    return tuple(sorted({ep.name for ep in metadata.entry_points(group=f"moepipe.{kind}")}))


def known(kind: str) -> tuple[str, ...]:
    """Every name that resolves without an import path: registered, built-in, entry points."""
    _check_kind(kind)
    names = list(BUILTINS[kind]) + [n for n in _registered[kind] if n not in BUILTINS[kind]]
    return tuple(names + [n for n in entry_point_names(kind) if n not in names])


def import_path(path: str) -> Any:
    module, _, attr = path.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


def _unknown(kind: str, name: str, field: str, why: str = "") -> Exception:
    how = (f"or add one: {field}=pkg.module:attr (or Hydra's _target_ form pkg.module.attr), "
           f"@moepipe.plugins.register({kind!r}, name), or an entry point in group moepipe.{kind}")
    return _config_error(f"{field}={name!r} is not known{why}: choose one of {', '.join(known(kind))} ({how})")


def resolve(kind: str, name: str, field: str | None = None) -> Any:
    """The plug-in `name` of `kind`; ConfigError (one line: the field, the known names, how to
    add one) when nothing answers to it. `field` overrides the config field named in errors."""
    _check_kind(kind)
    key = (kind, name)
    if key in _resolved:
        return _resolved[key]
    field = field or FIELDS[kind]
    if name in _registered[kind]:
        obj = _registered[kind][name]
    elif name in BUILTINS[kind]:
        entry = BUILTINS[kind][name]
        obj = import_path(entry) if isinstance(entry, str) else entry
    elif ":" in name:
        try:
            obj = import_path(name)
        except (ImportError, AttributeError) as err:
            raise _unknown(kind, name, field, f" (import failed: {type(err).__name__}: {err})") from None
    else:
        eps = [ep for ep in metadata.entry_points(group=f"moepipe.{kind}") if ep.name == name]
        if eps:
            obj = eps[0].load()
        elif "." in name:
            obj = _hydra_target(kind, name, field)
        else:
            raise _unknown(kind, name, field)
    _resolved[key] = obj
    return obj


def _hydra_target(kind: str, name: str, field: str) -> Any:
    """`name` as a Hydra `_target_` (pkg.module.attr), located the way Hydra instantiates one."""
    from hydra._internal.utils import _locate  # hydra.utils.get_object minus its error log line

    try:
        return _locate(name)
    except Exception as err:  # Hydra re-raises failures to locate with several lines: keep one
        why = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        raise _unknown(kind, name, field, f" (as a Hydra _target_: {why})") from None


def is_builtin(kind: str, name: str) -> bool:
    return name in BUILTINS[kind] and name not in _registered[kind]
