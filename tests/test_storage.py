"""The storage root: a local path, or a URI through pyarrow (file:// here; s3:// and gs:// take the
same code path), and the shared-root check a multi-node cluster needs."""

import sqlite3

import pytest

from rayft.store.storage import Storage, StorageError


def fake_checkpoint(storage, job, step):
    ck = storage.job_dir(job) / "checkpoints" / job / f"ckpt-{step:08d}"
    ck.mkdir(parents=True)
    (ck / "adapter.safetensors").write_bytes(b"w" * 10 + bytes([step]))
    (ck / "state.pt").write_bytes(b"s" + bytes([step]))
    return ck


def test_a_uri_root_pushes_the_newest_checkpoint_and_a_fresh_node_pulls_it(tmp_path):
    root = f"file://{tmp_path}/bucket/prefix"
    node_a = Storage(root, cache_dir=tmp_path / "cache-a")
    assert node_a.remote and node_a.local.is_relative_to(tmp_path / "cache-a")
    (node_a.job_dir("j1") / "data").mkdir(parents=True)
    (node_a.job_dir("j1") / "data" / "path-train.jsonl").write_text('{"a": 1}\n')
    fake_checkpoint(node_a, "j1", 2)
    node_a.push_job("j1")
    fake_checkpoint(node_a, "j1", 4)
    node_a.push_job("j1")
    remote = tmp_path / "bucket" / "prefix" / "jobs" / "j1"
    assert sorted(p.name for p in (remote / "checkpoints" / "j1").iterdir()) == ["ckpt-00000004"], "old ones dropped"

    # a half-uploaded newer checkpoint (no state.pt yet) is not taken
    (remote / "checkpoints" / "j1" / "ckpt-00000006").mkdir()
    (remote / "checkpoints" / "j1" / "ckpt-00000006" / "adapter.safetensors").write_bytes(b"partial")
    node_b = Storage(root, cache_dir=tmp_path / "cache-b")
    node_b.pull_job("j1")
    got = node_b.job_dir("j1") / "checkpoints" / "j1"
    assert [p.name for p in got.iterdir()] == ["ckpt-00000004"]
    assert (got / "ckpt-00000004" / "state.pt").read_bytes() == b"s\x04"
    assert (node_b.job_dir("j1") / "data" / "path-train.jsonl").read_text() == '{"a": 1}\n'


def test_the_registry_snapshot_round_trips_through_a_uri_root(tmp_path):
    root = f"file://{tmp_path}/bucket"
    a = Storage(root, cache_dir=tmp_path / "cache-a")
    db = sqlite3.connect(a.registry_path)
    db.execute("CREATE TABLE t (x)")
    db.execute("INSERT INTO t VALUES (42)")
    db.commit()
    a.push_registry()
    b = Storage(root, cache_dir=tmp_path / "cache-b")  # a controller restarted on another node
    b.pull_registry()
    assert sqlite3.connect(b.registry_path).execute("SELECT x FROM t").fetchall() == [(42,)]


def test_a_root_a_node_cannot_see_is_refused_with_a_clear_error(tmp_path):
    controller_view = Storage(tmp_path / "root")
    token = controller_view.write_marker()
    assert controller_view.write_marker() == token, "a restarted controller keeps the token"
    controller_view.check_marker(token, "node-a")  # the same filesystem: fine
    elsewhere = Storage(tmp_path / "other-disk")  # what a node-local path looks like from another node
    with pytest.raises(StorageError, match=r"storage root .*other-disk is not shared: node node-b cannot see .*"
                                           r"which the controller wrote.*shared filesystem .*s3://"):
        elsewhere.check_marker(token, "node-b")
    with pytest.raises(StorageError, match="storage root 'nope://x': cannot open it"):
        Storage("nope://x")
