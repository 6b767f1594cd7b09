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


class PluginRegistry(Registry):
    """A registry whose entries live in modules ``<package>/<name><suffix>.py``, imported on demand.

    ``--model X`` finds ``models/X_model.py``: the module registers its class when imported.
    ``base<suffix>.py`` holds the base class that plug-ins derive from, not a plug-in.
    """

    def __init__(self, kind: str, package: str, package_dir: Path, suffix: str):
        super().__init__(kind)
        self.package = package
        self.package_dir = Path(package_dir)
        self.suffix = suffix

    @property
    def names(self) -> list[str]:
        """Names of the plug-in modules on disk, sorted (without importing them)."""
        names = (p.name[: -len(self.suffix) - 3] for p in self.package_dir.glob(f"*{self.suffix}.py"))
        return sorted(name for name in names if name != "base")

    def load(self, name: str):
        """Import the plug-in ``name`` (which registers itself) and return its entry."""
        if name not in self.names:
            raise unknown_name_error(self.kind, name, self.names)
        importlib.import_module(f"{self.package}.{name}{self.suffix}")
        return self[name]
