"""The name rule (one for training and serving) and the server's store: paths, names, symlinks."""

import json
import os
import random
import string

import pytest

from rayft import names
from rayft.config import AdapterConfig, JobConfig, ServeConfig, parse_config
from rayft.serving.server import base_model_of
from rayft.serving.store import CONFIG_FILE, WEIGHTS_FILE, AdapterStore, StoreError, check_name
from rayft.store.registry import new_job_ids

ALLOWED = set(string.ascii_letters + string.digits + "._-")


def _expected(name: str) -> bool:
    """The rule, written out independently of rayft.names."""
    return (1 <= len(name) <= names.MAX_LENGTH and set(name) <= ALLOWED
            and name[0] in string.ascii_letters + string.digits)


def _random_name(rng: random.Random) -> str:
    pools = [string.ascii_letters + string.digits, "._-", "/\\\n\r\t\0 :*?", "é€\U0001f600\ud800", "."]
    n = rng.choice([0, 1, 2, rng.randint(3, 40), names.MAX_LENGTH - 1, names.MAX_LENGTH,
                    names.MAX_LENGTH + 1, 128, 129])
    weights = [20, 4, 1, 1, 1]
    text = "".join(rng.choice(rng.choices(pools, weights)[0]) for _ in range(n))
    return text + rng.choice(["", "", "", "\n", ".", "-"])


def _accepts(build) -> bool:
    try:
        build()
        return True
    except ValueError:
        return False


def test_one_name_rule_for_configs_the_store_and_the_server_over_generated_names():
    rng = random.Random(0)
    cases = [_random_name(rng) for _ in range(600)] + ["a\n", "a.b", "v1.2-final", "x" * 128, ".hidden", "-x", ""]
    assert any(_expected(c) for c in cases) and any(not _expected(c) for c in cases)
    for name in cases:
        want = _expected(name)
        assert names.is_name(name) == want, repr(name)
        assert _accepts(lambda n=name: AdapterConfig(name=n)) == want, repr(name)
        assert _accepts(lambda n=name: JobConfig(name=n, adapter="a", dataset="d", steps=1)) == want, repr(name)
        assert _accepts(lambda n=name: check_name(n)) == want, repr(name)
        if not want:
            with pytest.raises(StoreError) as e:
                check_name(name)
            assert names.RULE in str(e.value) and len(str(e.value)) < 400


def test_every_job_id_training_makes_is_a_servable_name(tmp_path):
    rng = random.Random(1)
    alnum = string.ascii_letters + string.digits
    for i in range(40):
        length = rng.choice([1, 5, names.MAX_LENGTH - 9, names.MAX_LENGTH - 8, names.MAX_LENGTH])
        name = rng.choice(alnum) + "".join(rng.choice(alnum + "._-") for _ in range(length - 1))
        cfg = parse_config({
            "base_model": {"path": "m"}, "adapters": [{"name": name}],
            "datasets": [{"name": "d", "path": "d.jsonl"}], "jobs": [{"adapter": name, "dataset": "d", "steps": 1}]})
        (job_id,) = new_job_ids(cfg)
        assert names.is_name(job_id), job_id
        # the publish link's temporary name `.<name>.<job id>.tmp` fits a file name
        assert len(f".{name}.{job_id}.tmp".encode()) <= 255
        d = tmp_path / f"s{i}" / "jobs" / job_id / "adapters" / job_id
        d.mkdir(parents=True)
        (d / CONFIG_FILE).write_text("{}")
        store = AdapterStore(tmp_path / f"s{i}")
        assert store.find(job_id) == d.resolve() and job_id in store.list()


def _adapter(d, base="base-model"):
    d.mkdir(parents=True, exist_ok=True)
    (d / CONFIG_FILE).write_text(json.dumps({"base_model_name_or_path": base}))
    (d / WEIGHTS_FILE).write_bytes(b"w")
    return d


def test_files_symlinked_out_of_the_store_are_never_handed_out(tmp_path):
    """Generated layouts: each adapter's directory, config and weights are real files, links inside
    the store, or links out of it; exactly the ones with nothing leading out are listed and found."""
    rng = random.Random(2)
    outside = _adapter(tmp_path / "outside", base="evil-base")
    root = tmp_path / "store"
    _adapter(root / "shared")  # link targets inside the store
    expect_ok = {}
    for i in range(40):
        name = f"ad{i}"
        d = root / "adapters" / name
        kinds = {f: rng.choice(["file", "inside", "outside", "outside-missing"]) for f in (CONFIG_FILE, WEIGHTS_FILE)}
        dir_kind = rng.choice(["dir", "dir", "dir", "link-inside", "link-outside"])
        if dir_kind == "dir":
            d.mkdir(parents=True)
            for f, kind in kinds.items():
                target = {"inside": root / "shared" / f, "outside": outside / f,
                          "outside-missing": tmp_path / "nowhere" / f}.get(kind)
                if target is None:
                    (d / f).write_text(json.dumps({"base_model_name_or_path": "base-model"}))
                else:
                    (d / f).symlink_to(target)
            # a link to a missing file is no adapter config; with a config there, a link out is refused
            has_config = kinds[CONFIG_FILE] != "outside-missing"
            expect_ok[name] = all(k in ("file", "inside") for k in kinds.values())
            refused = has_config and not expect_ok[name]
        else:
            d.parent.mkdir(parents=True, exist_ok=True)
            d.symlink_to(root / "shared" if dir_kind == "link-inside" else outside, target_is_directory=True)
            expect_ok[name] = dir_kind == "link-inside"
            refused = not expect_ok[name]
        store = AdapterStore(root)
        if expect_ok[name]:
            found = store.find(name)
            files = store.checked_files(found)
            assert all(p.resolve() == p and root.resolve() in p.parents for p in (files.config, files.weights))
            assert store.inside(f"adapters/{name}") == found
        elif refused:
            with pytest.raises(StoreError, match="leaves the store"):
                store.find(name)
            with pytest.raises(StoreError, match="leaves the store"):
                store.inside(f"adapters/{name}")
    listed = AdapterStore(root).list()
    assert {n for n in listed if n.startswith("ad")} == {n for n, ok in expect_ok.items() if ok}
    assert any(expect_ok.values()) and not all(expect_ok.values())
    # the base model is read only from configs inside the store: the outside one names another base
    assert base_model_of(ServeConfig(store=root)).path == "base-model"


def test_bad_paths_are_store_errors_that_name_the_path(tmp_path):
    store = AdapterStore(tmp_path)
    long_name = "a" * (os.pathconf(tmp_path, "PC_NAME_MAX") + 1)
    for path, why in [("x\0y", "NUL"), (long_name, "too long"), ("a/" * 3000, "too long"),
                      ("../x", "'..'"), ("/etc", "absolute"), ("adapters/../../x", "'..'")]:
        with pytest.raises(StoreError, match=why) as e:
            store.inside(path)
        assert str(e.value).startswith("path ") and len(str(e.value)) < 300
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(StoreError, match="path 'loop'"):
        store.inside("loop")
