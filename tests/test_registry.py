"""The controller's job registry: SQLite, survives a restart, refuses impossible state changes."""

import pytest

from rayft.config import parse_config
from rayft.store.registry import JobRegistry, RegistryError


def config(*names, priority=0):
    return parse_config({
        "base_model": {"path": "/models/tiny"},
        "adapters": [{"name": n, "r": 4 + i} for i, n in enumerate(names)],
        "datasets": [{"name": f"d-{n}", "path": f"/data/{n}.jsonl"} for n in names],
        "jobs": [{"adapter": n, "dataset": f"d-{n}", "steps": 10, "priority": priority} for n in names],
    })


def test_submit_persists_each_job_with_only_its_own_config_and_survives_a_restart(tmp_path):
    reg = JobRegistry(tmp_path / "state" / "jobs.db")
    ids = reg.submit(config("a", "b", priority=3))
    reg.transition(ids[0], "running", replica="replica-0", total_steps=10)
    reg.transition(ids[0], "running", step=4)
    reg.record_metrics(ids[0], [(1, 2.5, 900.0), (2, 2.1, 950.0)])
    reg.close()

    again = JobRegistry(tmp_path / "state" / "jobs.db")  # a restarted controller
    a, b = again.get(ids[0]), again.get(ids[1])
    assert (a.state, a.step, a.total_steps, a.replica, a.priority) == ("running", 4, 10, "replica-0", 3)
    assert b.state == "queued"
    assert [j.name for j in a.config.jobs] == ["a"] and [x.name for x in a.config.adapters] == ["a"]
    assert a.config.adapters[0].r == 4 and str(a.config.datasets[0].path) == "/data/a.jsonl"
    assert [m[:3] for m in again.metrics(ids[0])] == [(1, 2.5, 900.0), (2, 2.1, 950.0)]
    assert [r.id for r in again.list(("queued",))] == [ids[1]]


def test_state_changes_follow_the_lifecycle(tmp_path):
    reg = JobRegistry(tmp_path / "jobs.db")
    (job,) = reg.submit(config("a"))
    with pytest.raises(RegistryError, match="cannot go from queued to done"):
        reg.transition(job, "done")
    reg.transition(job, "running")
    reg.transition(job, "queued", error=None)  # preempted or its replica died: back in the queue
    reg.transition(job, "running")
    reg.transition(job, "done", step=10)
    with pytest.raises(RegistryError, match="cannot go from done to running"):
        reg.transition(job, "running")
    assert reg.cancel(job).state == "done"  # cancelling a finished job changes nothing
    with pytest.raises(RegistryError, match="no job with id 'nope'"):
        reg.get("nope")
    with pytest.raises(RegistryError, match="cannot set"):
        reg.transition(job, "done", priority=9)


def test_live_names_are_unique_and_a_failed_submit_writes_nothing(tmp_path):
    reg = JobRegistry(tmp_path / "jobs.db")
    reg.submit(config("a"))
    with pytest.raises(RegistryError, match="already queued or running under these names: a"):
        reg.submit(config("b", "a"))
    assert [r.name for r in reg.list()] == ["a"]
    (b,) = reg.submit(config("b"))
    reg.cancel(b)
    reg.submit(config("b"))  # a cancelled name can be used again
    assert sorted(r.state for r in reg.list()) == ["cancelled", "queued", "queued"]


def test_a_replayed_step_keeps_one_metric_row(tmp_path):
    reg = JobRegistry(tmp_path / "jobs.db")
    (job,) = reg.submit(config("a"))
    reg.record_metrics(job, [(1, 3.0, 100.0), (2, 2.0, 100.0)])
    reg.record_metrics(job, [(2, 1.9, 120.0), (3, 1.5, 120.0)])  # resumed from step 1's checkpoint
    assert [m[:3] for m in reg.metrics(job)] == [(1, 3.0, 100.0), (2, 1.9, 120.0), (3, 1.5, 120.0)]


def test_a_priority_changes_in_the_row_and_the_stored_config_and_only_while_the_job_lives(tmp_path):
    reg = JobRegistry(tmp_path / "jobs.db")
    (job,) = reg.submit(config("a", priority=1))
    rec = reg.set_priority(job, -3)
    assert rec.priority == -3 and rec.config.jobs[0].priority == -3
    again = JobRegistry(tmp_path / "jobs.db").get(job)
    assert again.priority == again.config.jobs[0].priority == -3
    for bad in ("5", 1.5, True, None):
        with pytest.raises(RegistryError, match="is not an integer"):
            reg.set_priority(job, bad)
    with pytest.raises(RegistryError, match="no job with id 'nope'"):
        reg.set_priority("nope", 1)
    reg.cancel(job)
    with pytest.raises(RegistryError, match="is cancelled: its priority can no longer change"):
        reg.set_priority(job, 2)
    assert reg.get(job).priority == -3


def test_a_registry_written_before_the_padding_and_eval_columns_opens_and_keeps_its_rows(tmp_path):
    import sqlite3

    db = sqlite3.connect(tmp_path / "old.db")
    db.executescript("CREATE TABLE metrics (job_id TEXT NOT NULL, step INTEGER NOT NULL, loss REAL, "
                     "tokens_per_s REAL, at REAL NOT NULL, PRIMARY KEY (job_id, step));"
                     "INSERT INTO metrics VALUES ('j', 1, 2.0, 10.0, 0.0);")
    db.commit()
    db.close()
    reg = JobRegistry(tmp_path / "old.db")
    reg.record_metrics("j", [(2, 1.5, 11.0, 0.25, 1.9)])
    assert reg.metrics("j") == [(1, 2.0, 10.0, None, None), (2, 1.5, 11.0, 0.25, 1.9)]
    assert reg.metrics("j", after_step=1)[0].eval_loss == 1.9
