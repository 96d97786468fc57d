"""The adapter store as the server sees it: which adapters exist, and where, under one root.

Three layouts are read, all written by rayft:
    <root>/adapters/<name>/                      `rayft train --output <root>`
    <root>/jobs/<job id>/adapters/<job id>/      the cluster's storage root (served by job id)
    <root>/compressed/<store>/                   `rayft compress --output`: each adapter in it
                                                 served by its own name
An adapter is a directory holding adapter_config.json (and adapter_model.safetensors); a
compressed store one holding subspace.json (its adapters' names) and basis.safetensors. Names and
paths given by clients must stay inside the root: no `..`, no absolute paths, no symlinks out, for
the directory and for every file in it that is read. Pure Python; no Ray, no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rayft import layout, names

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
STORE_FILES = (layout.SUBSPACE_META, layout.SUBSPACE_BASIS)


class StoreError(ValueError):
    pass


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter's directory and its files, resolved and checked to be inside the store (for a
    compressed store: subspace.json and basis.safetensors)."""

    dir: Path
    config: Path
    weights: Path


class AdapterStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self._members: dict[Path, tuple[tuple, list[str]]] = {}  # a compressed store's names, by its file's identity

    def list(self) -> dict[str, Path]:
        """Every adapter under the root, by name (a name in several layouts: an `adapters/` one
        wins, then a job's, then the first compressed store's). One whose directory or files lead
        out of the store is not listed."""
        found: dict[str, Path] = {}
        for store in reversed(self.compressed_stores()):
            found.update(dict.fromkeys(self.members(store), store))
        for pattern in (str(layout.job("*") / layout.adapter("*")), str(layout.adapter("*"))):
            for d in sorted(self.root.glob(pattern)):
                if not names.is_name(d.name):
                    continue
                try:
                    found[d.name] = self.checked_files(d).dir
                except StoreError:
                    continue
        return found

    def compressed_stores(self) -> list[Path]:
        """The compressed stores under the root (checked), by name."""
        found = []
        for d in sorted(self.root.glob(str(layout.compressed("*")))):
            if names.is_name(d.name) and _exists(d / layout.SUBSPACE_META):
                try:
                    found.append(self.checked_files(d, files=STORE_FILES).dir)
                except StoreError:
                    continue
        return found

    def members(self, store: Path) -> list[str]:
        """The adapter names a compressed store holds (those that follow the name rule), read from
        its subspace.json once per version of that file; none if it cannot be read."""
        meta = store / layout.SUBSPACE_META
        identity = file_identity(meta)
        if identity is None:
            return []
        cached = self._members.get(store)
        if cached is None or cached[0] != identity:
            try:
                adapters = json.loads(meta.read_text()).get("adapters", {})
                found = [n for n in adapters if names.is_name(n)] if isinstance(adapters, dict) else []
            except (OSError, ValueError, AttributeError):
                found = []
            self._members[store] = cached = (identity, found)
        return cached[1]

    def find(self, name: str) -> Path | None:
        """The checked directory of the adapter called `name`, None if there is none; a StoreError
        if the name breaks the rule or its directory or files lead out of the store."""
        check_name(name)
        for d in (self.root / layout.adapter(name), self.root / layout.job(name) / layout.adapter(name)):
            if _exists(d / CONFIG_FILE):
                return self.checked_files(d).dir
        return next((store for store in self.compressed_stores() if name in self.members(store)), None)

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
        for files in ((CONFIG_FILE, WEIGHTS_FILE), STORE_FILES):
            if any(_exists(full / f) for f in files):
                self.checked_files(full, text, files)
        return full

    def checked_files(self, d: Path, shown_as: str | None = None,
                      files: tuple[str, str] = (CONFIG_FILE, WEIGHTS_FILE)) -> AdapterFiles:
        """An adapter directory's config and weights files (or a compressed store's `STORE_FILES`),
        each resolved (symlinks followed) and refused if it leads out of the store: what the loader
        may open."""
        shown_as = shown_as if shown_as is not None else str(d)
        full = _resolve(d, shown_as)
        if not _is_within(full, self.root):
            raise StoreError(f"path {names.shown(shown_as)} leaves the store")
        resolved = []
        for f in files:
            resolved.append(_resolve(full / f, shown_as))
            if not _is_within(resolved[-1], self.root):
                raise StoreError(f"path {names.shown(shown_as)}: {f} is a link that leaves the store")
        return AdapterFiles(full, *resolved)


def file_identity(path: Path) -> tuple | None:
    """What tells two versions of a file apart: its inode, mtime and size; None if it is not there."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


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
