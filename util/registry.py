"""Name -> object tables that refuse duplicates and explain unknown names."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def unknown_name_error(kind: str, name: str, valid: Iterable[str]) -> ValueError:
    """A ValueError that lists the valid names and suggests the closest one."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}: choose one of {', '.join(valid)}{hint}")


def lookup(table: Mapping[str, T], name: str, what: str) -> T:
    """``table[name]``, or a ValueError naming the valid keys and the closest one.

    Args:
        table: name -> anything, e.g. ``GENERATORS``.
        name: the requested name, e.g. the value of ``--netG``.
        what: what the table holds, for the message, e.g. ``"generator (--netG)"``.
    """
    if name in table:
        return table[name]
    raise unknown_name_error(what, name, table)


class Registry(dict):
    """A dict filled by a decorator; registering a name twice is an error at import time.

    >>> MODELS = Registry("model")
    >>> @MODELS.register("pix2pix")
    ... class Pix2PixModel: ...
    """

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str):
        def add(obj):
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is registered twice ({self[name]!r} and {obj!r})")
            self[name] = obj
            return obj

        return add

    def __missing__(self, name: str):
        raise unknown_name_error(self.kind, name, self.keys())


def plugin_names(package_dir: Path, suffix: str) -> list[str]:
    """Names of the plug-in modules ``<name><suffix>.py`` in a package folder, sorted.

    ``base<suffix>.py`` holds the base class that plug-ins derive from, not a plug-in.
    """
    names = (p.name[: -len(suffix) - 3] for p in package_dir.glob(f"*{suffix}.py"))
    return sorted(name for name in names if name != "base")


def load_plugin(package: str, package_dir: Path, suffix: str, name: str, registry: Registry):
    """Import ``<package>.<name><suffix>`` (which registers itself) and return its entry."""
    names = plugin_names(package_dir, suffix)
    if name not in names:
        raise unknown_name_error(registry.kind, name, names)
    importlib.import_module(f"{package}.{name}{suffix}")
    return registry[name]
