"""The job registry: every submitted job, its state, progress and metric history, in SQLite.

The controller keeps nothing else that matters: a controller that is killed and restarted opens
the same file and carries on. Each job row stores a RunConfig holding just that job (its base
model, adapter and dataset), so a job can be rebuilt on any replica from the registry alone.
stdlib + the config models; no Ray.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from rayft import names
from rayft.config import RunConfig
from rayft.states import REGISTRY_STATES, TRANSITIONS, JobState

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    adapter TEXT NOT NULL,
    config TEXT NOT NULL,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER,
    replica TEXT,
    error TEXT,
    submitted_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS metrics (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    step INTEGER NOT NULL,
    loss REAL,
    tokens_per_s REAL,
    at REAL NOT NULL,
    PRIMARY KEY (job_id, step)
);
"""
# columns added after the first release: a registry written before them gets them when opened
_ADDED_COLUMNS = {"metrics": {"padding": "REAL", "eval_loss": "REAL"}}


class RegistryError(ValueError):
    pass


class MetricRow(NamedTuple):
    """One optimizer step of a job: its training loss, tokens/s, the padding share of its rows, and
    its held-out loss where one was measured at that step."""

    step: int
    loss: float | None
    tokens_per_s: float | None
    padding: float | None = None
    eval_loss: float | None = None


def new_job_ids(cfg: RunConfig) -> list[str]:
    return [names.job_id(job.name, uuid.uuid4().hex[:8]) for job in cfg.jobs]


def job_config(cfg: RunConfig, job_name: str) -> RunConfig:
    """The config of one job alone: its base model, adapter and dataset."""
    job = next(j for j in cfg.jobs if j.name == job_name)
    return cfg.model_copy(update={
        "jobs": [job], "adapters": [cfg.adapter(job.adapter)], "datasets": [cfg.dataset(job.dataset)],
    })


@dataclass(frozen=True)
class JobRecord:
    id: str
    name: str
    adapter: str
    config: RunConfig
    state: JobState
    priority: int
    step: int
    total_steps: int | None
    replica: str | None
    error: str | None
    submitted_at: float
    updated_at: float


class JobRegistry:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")  # readers (status) never block the writer
        self._db.execute("PRAGMA synchronous=FULL")  # a committed state survives a power cut
        self._db.executescript(_SCHEMA)
        for table, columns in _ADDED_COLUMNS.items():
            have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for column, kind in columns.items():
                if column not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def close(self) -> None:
        self._db.close()

    def submit(self, cfg: RunConfig, ids: list[str] | None = None) -> list[str]:
        """One queued row per job of the config; returns their ids. Names must be new among live jobs."""
        live = {r.name for r in self.list((JobState.QUEUED, JobState.RUNNING))}
        clash = [j.name for j in cfg.jobs if j.name in live]
        if clash:
            raise RegistryError(f"jobs already queued or running under these names: {', '.join(clash)}")
        now = time.time()
        ids = ids or new_job_ids(cfg)
        with self._tx():
            for job, job_id in zip(cfg.jobs, ids, strict=True):
                self._db.execute(
                    "INSERT INTO jobs (id, name, adapter, config, state, priority, submitted_at, updated_at)"
                    " VALUES (?, ?, ?, ?, 'queued', ?, ?, ?)",
                    (job_id, job.name, job.adapter, job_config(cfg, job.name).model_dump_json(), job.priority, now, now),
                )
        return ids

    def set_config(self, job_id: str, cfg: RunConfig) -> None:
        """Replace a job's config (the controller shrinking its token budget after an OOM)."""
        with self._tx():
            self._db.execute("UPDATE jobs SET config = ?, updated_at = ? WHERE id = ?",
                             (cfg.model_dump_json(), time.time(), job_id))

    def get(self, job_id: str) -> JobRecord:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise RegistryError(f"no job with id {job_id!r}")
        return self._record(row)

    def list(self, states: tuple[str, ...] | None = None) -> list[JobRecord]:
        if states:
            q = f"SELECT * FROM jobs WHERE state IN ({','.join('?' * len(states))}) ORDER BY submitted_at, id"
            rows = self._db.execute(q, states).fetchall()
        else:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY submitted_at, id").fetchall()
        return [self._record(r) for r in rows]

    def transition(self, job_id: str, state: JobState, **fields) -> JobRecord:
        """Move a job to `state` (checked against TRANSITIONS), updating step/total_steps/replica/error."""
        if state not in REGISTRY_STATES:
            raise RegistryError(f"unknown state {state!r}")
        unknown = set(fields) - {"step", "total_steps", "replica", "error"}
        if unknown:
            raise RegistryError(f"cannot set {sorted(unknown)}")
        with self._tx():
            current = self.get(job_id).state
            if state != current and state not in TRANSITIONS[current]:
                raise RegistryError(f"job {job_id}: cannot go from {current} to {state}")
            sets = ", ".join(f"{k} = ?" for k in ("state", "updated_at", *fields))
            self._db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (state, time.time(), *fields.values(), job_id))
        return self.get(job_id)

    def cancel(self, job_id: str) -> JobRecord:
        rec = self.get(job_id)
        if rec.state.is_terminal:
            return rec  # already over: cancelling is a no-op, not an error
        return self.transition(job_id, JobState.CANCELLED)

    def set_priority(self, job_id: str, priority: int) -> JobRecord:
        """A live job's new priority, in its row and in its stored config (one value, never two)."""
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise RegistryError(f"priority: {names.shown(priority)} is not an integer")
        with self._tx():
            rec = self.get(job_id)
            if rec.state.is_terminal:
                raise RegistryError(f"job {job_id} is {rec.state}: its priority can no longer change")
            job = rec.config.jobs[0].model_copy(update={"priority": priority})
            cfg = rec.config.model_copy(update={"jobs": [job]})
            self._db.execute("UPDATE jobs SET priority = ?, config = ?, updated_at = ? WHERE id = ?",
                             (priority, cfg.model_dump_json(), time.time(), job_id))
        return self.get(job_id)

    def record_metrics(self, job_id: str, rows: list[tuple]) -> None:
        """MetricRow-shaped rows ((step, loss, tokens/s[, padding[, eval loss]])); a step recorded
        twice (replayed after a resume) keeps the last."""
        now = time.time()
        rows = [MetricRow(*r) for r in rows]
        with self._tx():
            self._db.executemany(
                "INSERT OR REPLACE INTO metrics (job_id, step, loss, tokens_per_s, padding, eval_loss, at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)", [(job_id, *r, now) for r in rows])

    def metrics(self, job_id: str, after_step: int = -1) -> list[MetricRow]:
        """The job's rows by step (those after `after_step` only: what a page polling it lacks)."""
        return [MetricRow(*r) for r in self._db.execute(
            "SELECT step, loss, tokens_per_s, padding, eval_loss FROM metrics WHERE job_id = ? AND step > ?"
            " ORDER BY step", (job_id, after_step))]

    def _tx(self):
        return _Transaction(self._db)

    @staticmethod
    def _record(row) -> JobRecord:
        (id_, name, adapter, config, state, priority, step, total, replica, error, sub, upd) = row
        return JobRecord(id_, name, adapter, RunConfig.model_validate(json.loads(config)), JobState(state), priority,
                         step, total, replica, error, sub, upd)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (or ROLLBACK): all of a change or none of it."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        if not self.db.in_transaction:
            self.db.execute("BEGIN IMMEDIATE")
            self.owner = True
        else:
            self.owner = False
        return self.db

    def __exit__(self, exc_type, *_):
        if self.owner:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        return False
