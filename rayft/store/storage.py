"""The storage root: the job registry, every job's checkpoints and its finished adapter.

    root/registry.sqlite
    root/jobs/<job id>/checkpoints/<job id>/ckpt-<step>/{adapter.safetensors,state.pt}
    root/jobs/<job id>/adapters/<job id>/            (PEFT format, when the job is done)

The root is a local path (on a multi-node cluster it must be shared: NFS, the KubeRay volume) or a
URI that pyarrow's filesystems open (s3://, gs://, file://). Training code only ever writes local
files: with a URI root each node works in a local cache and pushes a job's newest checkpoint after
writing it (the state file last, so a half-uploaded checkpoint is never taken as complete), and
pulls it before resuming. stdlib + pyarrow; no Ray.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import tempfile
from pathlib import Path

from rayft import layout

MARKER = ".rayft-root"


class StorageError(ValueError):
    pass


class Storage:
    def __init__(self, root: str | Path, cache_dir: str | Path | None = None):
        self.root = str(root)
        self.remote = "://" in self.root
        if self.remote:
            from pyarrow import fs

            try:
                self._fs, self._base = fs.FileSystem.from_uri(self.root)
            except Exception as e:  # unknown scheme, missing credentials, bad bucket name
                raise StorageError(f"storage root {self.root!r}: cannot open it: {e}") from e
            self._base = self._base.rstrip("/")
            key = hashlib.sha1(self.root.encode()).hexdigest()[:12]
            self.local = Path(cache_dir or Path(tempfile.gettempdir()) / "rayft-cache") / key
        else:
            self.local = Path(self.root).expanduser().resolve()
        self.local.mkdir(parents=True, exist_ok=True)

    def __reduce__(self):  # sent to replicas by root; each node opens its own filesystem and cache
        return (Storage, (self.root,))

    @property
    def registry_path(self) -> Path:
        return self.local / layout.REGISTRY

    def job_dir(self, job_id: str) -> Path:
        return self.local / layout.job(job_id)

    def adapter_dir(self, job_id: str) -> str:
        """Where a finished job's adapter is, as the user reads it (a path or a URI)."""
        return f"{self.root.rstrip('/')}/{layout.job(job_id) / layout.adapter(job_id)}"

    def publish_adapter(self, job_id: str, name: str) -> None:
        """Point `adapters/<name>` at a finished job's adapter (local roots): the server then
        answers to the adapter's own name with its newest version (and to the job id)."""
        if self.remote:
            return
        link = self.local / layout.adapter(name)
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".{name}.{job_id}.tmp")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(Path("..") / layout.job(job_id) / layout.adapter(job_id), target_is_directory=True)
        tmp.replace(link)  # atomic: readers see the old version or the new one

    # ---- remote roots: push and pull -------------------------------------------------------------

    def push_job(self, job_id: str) -> None:
        """Upload a job's newest checkpoint and its adapter, then drop older remote checkpoints."""
        if not self.remote:
            return
        local = self.job_dir(job_id)
        ckpts = local / layout.checkpoints(job_id)
        newest = (max((p for p in ckpts.iterdir() if layout.CHECKPOINT_NAME.match(p.name)), default=None)
                  if ckpts.is_dir() else None)
        remote = f"{self._base}/{layout.job(job_id)}"
        if (local / "data").is_dir() and not self._exists(f"{remote}/data"):
            self._upload_tree(local / "data", f"{remote}/data")
        adapters = local / "adapters"
        if adapters.is_dir():
            self._upload_tree(adapters, f"{remote}/adapters")
        if newest is not None:
            dst = f"{remote}/{layout.checkpoints(job_id)}/{newest.name}"
            self._fs.create_dir(dst, recursive=True)
            for name in ("adapter.safetensors", "state.pt"):  # state.pt last: it marks the checkpoint complete
                self._upload_file(newest / name, f"{dst}/{name}")
            for old in self._list_ckpts(job_id):
                if old < newest.name:
                    self._fs.delete_dir(f"{remote}/{layout.checkpoints(job_id)}/{old}")

    def pull_job(self, job_id: str) -> None:
        """Download a job's newest complete remote checkpoint (and adapter) into the local cache."""
        if not self.remote:
            return
        remote = f"{self._base}/{layout.job(job_id)}"
        if not (self.job_dir(job_id) / "data").is_dir() and self._exists(f"{remote}/data"):
            self._download_tree(f"{remote}/data", self.job_dir(job_id) / "data")
        complete = [c for c in self._list_ckpts(job_id)
                    if self._exists(f"{remote}/{layout.checkpoints(job_id)}/{c}/state.pt")]
        if complete:
            src = f"{remote}/{layout.checkpoints(job_id)}/{complete[-1]}"
            self._download_tree(src, self.job_dir(job_id) / layout.checkpoints(job_id) / complete[-1])

    def push_registry(self) -> None:
        """Upload a consistent snapshot of the registry (SQLite's backup API, then one file upload)."""
        if not self.remote:
            return
        with tempfile.TemporaryDirectory() as tmp:
            db, snap = sqlite3.connect(self.registry_path), sqlite3.connect(Path(tmp) / layout.REGISTRY)
            db.backup(snap)
            snap.close()
            db.close()
            self._fs.create_dir(self._base, recursive=True)
            self._upload_file(Path(tmp) / layout.REGISTRY, f"{self._base}/{layout.REGISTRY}")

    def pull_registry(self) -> None:
        if self.remote and not self.registry_path.exists() and self._exists(f"{self._base}/{layout.REGISTRY}"):
            self._download_file(f"{self._base}/{layout.REGISTRY}", self.registry_path)

    # ---- a local root on several nodes must be shared ----------------------------------------------

    def write_marker(self) -> str:
        """A random token in the root; every node must read it back (see `check_marker`)."""
        if self.remote:
            return ""
        marker = self.local / MARKER
        token = marker.read_text().strip() if marker.is_file() else ""
        if not token:
            token = secrets.token_hex(8)
            marker.write_text(token + "\n")
        return token

    def check_marker(self, token: str, node: str) -> None:
        """Raise unless this node sees the same root as the controller (a shared filesystem)."""
        if self.remote:
            return
        marker = self.local / MARKER
        seen = marker.read_text().strip() if marker.is_file() else None
        if seen != token:
            what = f"sees a different {marker}" if seen else f"cannot see {marker}"
            raise StorageError(
                f"storage root {self.root} is not shared: node {node} {what}, which the controller wrote. "
                "On a multi-node cluster the root must be on a shared filesystem (NFS, the KubeRay volume "
                "at /mnt/rayft) or a URI (s3://bucket/prefix, gs://bucket/prefix)."
            )

    # ---- pyarrow plumbing ------------------------------------------------------------------------

    def _exists(self, path: str) -> bool:
        from pyarrow import fs

        return self._fs.get_file_info(path).type != fs.FileType.NotFound

    def _list_ckpts(self, job_id: str) -> list[str]:
        from pyarrow import fs

        folder = f"{self._base}/{layout.job(job_id) / layout.checkpoints(job_id)}"
        infos = self._fs.get_file_info(fs.FileSelector(folder, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == fs.FileType.Directory and layout.CHECKPOINT_NAME.match(i.base_name))

    def _upload_file(self, src: Path, dst: str) -> None:
        with open(src, "rb") as f, self._fs.open_output_stream(dst) as out:
            while chunk := f.read(1 << 22):
                out.write(chunk)

    def _download_file(self, src: str, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".part")
        with self._fs.open_input_stream(src) as inp, open(tmp, "wb") as out:
            while chunk := inp.read(1 << 22):
                out.write(chunk)
        tmp.replace(dst)

    def _upload_tree(self, src: Path, dst: str) -> None:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                target = f"{dst}/{p.relative_to(src).as_posix()}"
                self._fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
                self._upload_file(p, target)

    def _download_tree(self, src: str, dst: Path) -> None:
        from pyarrow import fs

        files = [i for i in self._fs.get_file_info(fs.FileSelector(src, recursive=True)) if i.type == fs.FileType.File]
        # state.pt last: a reader of the local cache never sees a checkpoint without its weights
        for info in sorted(files, key=lambda i: i.base_name == "state.pt"):
            self._download_file(info.path, dst / info.path[len(src):].lstrip("/"))
