"""Files and directories that appear whole or not at all (stdlib only: every layer may use it)."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path


def _umask_mode(mode: int) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(final: str | Path):
    """Yield a fresh temp directory beside `final`; on success it takes `final`'s place by rename.

    A crash mid-write leaves at most a hidden `.tmp-*` folder, never a half-written `final`; an
    existing `final` is renamed aside first, so at no point is there neither the old nor the new."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        # modes as open() and mkdir() give under the umask: mkdtemp makes 0700 and some writers
        # (safetensors) 0600, which would hide a published adapter from a server run by another user
        for f in [tmp, *tmp.rglob("*")]:
            if f.is_symlink():  # its mode is its target's
                continue
            os.chmod(f, _umask_mode(0o777 if f.is_dir() else 0o666))
            if f.is_file():
                _fsync(f)
        old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}") if final.exists() else None
        if old is not None:
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
