"""The adapter store as the server sees it: which adapters exist, and where, under one root.

Two layouts are read, both written by rayft:
    <root>/adapters/<name>/                      `rayft train --output <root>`
    <root>/jobs/<job id>/adapters/<job id>/      the cluster's storage root (served by job id)
An adapter is a directory holding adapter_config.json. Names and paths given by clients must stay
inside the root: no `..`, no absolute paths, no symlinks out. Pure Python; no Ray, no torch.
"""

from __future__ import annotations

import re
from pathlib import Path

from rayft import layout

CONFIG_FILE = "adapter_config.json"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class StoreError(ValueError):
    pass


class AdapterStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def list(self) -> dict[str, Path]:
        """Every adapter under the root, by name (a name in both layouts: the `adapters/` one wins)."""
        found: dict[str, Path] = {}
        for pattern in (str(layout.job("*") / layout.adapter("*")), str(layout.adapter("*"))):
            for d in sorted(self.root.glob(pattern)):
                if (d / CONFIG_FILE).is_file() and NAME.match(d.name):
                    found[d.name] = d
        return found

    def find(self, name: str) -> Path | None:
        check_name(name)
        for d in (self.root / layout.adapter(name), self.root / layout.job(name) / layout.adapter(name)):
            if (d / CONFIG_FILE).is_file():
                return self.inside(d)
        return None

    def inside(self, path: str | Path) -> Path:
        """A client-given path, relative to the root, resolved; refused if it leaves the root."""
        p = Path(path)
        if p.is_absolute() and not _is_within(p.resolve(), self.root):
            raise StoreError(f"path {str(path)!r}: absolute paths are not allowed; give a path inside the store")
        if ".." in p.parts:
            raise StoreError(f"path {str(path)!r}: '..' is not allowed; give a path inside the store")
        full = (self.root / p).resolve()
        if not _is_within(full, self.root):
            raise StoreError(f"path {str(path)!r} leaves the store")
        return full


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise StoreError(f"adapter name {name!r}: use letters, digits, '.', '_' and '-' (no '/', no leading '.')")
    return name


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents
