"""The adapter store as the server sees it: which adapters exist, and where, under one root.

Two layouts are read, both written by rayft:
    <root>/adapters/<name>/                      `rayft train --output <root>`
    <root>/jobs/<job id>/adapters/<job id>/      the cluster's storage root (served by job id)
An adapter is a directory holding adapter_config.json (and adapter_model.safetensors). Names and
paths given by clients must stay inside the root: no `..`, no absolute paths, no symlinks out, for
the directory and for every file in it that is read. Pure Python; no Ray, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rayft import layout, names

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class StoreError(ValueError):
    pass


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter's directory and its files, resolved and checked to be inside the store."""

    dir: Path
    config: Path
    weights: Path


class AdapterStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def list(self) -> dict[str, Path]:
        """Every adapter under the root, by name (a name in both layouts: the `adapters/` one wins).
        One whose directory or files lead out of the store is not listed."""
        found: dict[str, Path] = {}
        for pattern in (str(layout.job("*") / layout.adapter("*")), str(layout.adapter("*"))):
            for d in sorted(self.root.glob(pattern)):
                if not names.is_name(d.name):
                    continue
                try:
                    found[d.name] = self.checked_files(d).dir
                except StoreError:
                    continue
        return found

    def find(self, name: str) -> Path | None:
        """The checked directory of the adapter called `name`, None if there is none; a StoreError
        if the name breaks the rule or its directory or files lead out of the store."""
        check_name(name)
        for d in (self.root / layout.adapter(name), self.root / layout.job(name) / layout.adapter(name)):
            if _exists(d / CONFIG_FILE):
                return self.checked_files(d).dir
        return None

    def inside(self, path: str | Path) -> Path:
        """A client-given path, relative to the root, resolved; refused if it, or an adapter file
        in it, leaves the root."""
        text = str(path)
        if "\0" in text:
            raise StoreError(f"path {names.shown(text)}: contains a NUL character")
        p = Path(path)
        if p.is_absolute() and not _is_within(_resolve(p, text), self.root):
            raise StoreError(f"path {names.shown(text)}: absolute paths are not allowed; give a path inside the store")
        if ".." in p.parts:
            raise StoreError(f"path {names.shown(text)}: '..' is not allowed; give a path inside the store")
        full = _resolve(self.root / p, text)
        if not _is_within(full, self.root):
            raise StoreError(f"path {names.shown(text)} leaves the store")
        if _exists(full / CONFIG_FILE) or _exists(full / WEIGHTS_FILE):
            self.checked_files(full, text)
        return full

    def checked_files(self, d: Path, shown_as: str | None = None) -> AdapterFiles:
        """An adapter directory's config and weights files, each resolved (symlinks followed) and
        refused if it leads out of the store: what the loader may open."""
        shown_as = shown_as if shown_as is not None else str(d)
        full = _resolve(d, shown_as)
        if not _is_within(full, self.root):
            raise StoreError(f"path {names.shown(shown_as)} leaves the store")
        files = {}
        for f in (CONFIG_FILE, WEIGHTS_FILE):
            files[f] = _resolve(full / f, shown_as)
            if not _is_within(files[f], self.root):
                raise StoreError(f"path {names.shown(shown_as)}: {f} is a link that leaves the store")
        return AdapterFiles(full, files[CONFIG_FILE], files[WEIGHTS_FILE])


def check_name(name: str) -> str:
    try:
        return names.check_name(name, "adapter name")
    except ValueError as e:
        raise StoreError(str(e)) from None


def _resolve(p: Path, shown_as: str) -> Path:
    """`p` with every symlink followed; a StoreError for a path the OS refuses (a name over its
    limit, a symlink loop, a NUL), which a missing file is not."""
    try:
        full = p.resolve()
        try:
            full.stat()
        except (FileNotFoundError, NotADirectoryError):
            pass
    except (OSError, RuntimeError, ValueError) as e:
        raise StoreError(f"path {names.shown(shown_as)}: {e.strerror if isinstance(e, OSError) else e}") from None
    return full


def _exists(p: Path) -> bool:
    """Whether a file is there; a path the OS refuses (a name over its limit) is not."""
    try:
        return p.is_file()
    except (OSError, ValueError):
        return False


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents
