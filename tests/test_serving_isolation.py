"""The engine keeps requests apart: one that breaks ends alone, a reload or a retrain never touches
running requests, a refused unload changes nothing, a cancelled request stops at once.

Every case runs a batch of good requests step by step and sends the bad one (or the reload, the
cancel) while they run; the good ones must come out as they do alone.
"""

import os
import random
import shutil
import threading
from collections import defaultdict

import pytest
import torch
from test_serving_engine import engine_for, store  # noqa: F401  (the store fixture: adapters a, b, c)

from rayft.serving.engine import AdapterInUseError, AdapterLoadError, GenRequest, Sampling, seed_of


class Recorder:
    """Every callback of a run, in order."""

    def __init__(self):
        self.log: list = []
        self.lock = threading.Lock()

    def delta(self, key, text, finish, n):
        with self.lock:
            self.log.append(("delta", key, text, finish))

    def error(self, key, error):
        with self.lock:
            self.log.append(("error", key, error))

    def mark(self, *what):
        with self.lock:
            self.log.append(what)

    def text(self, key) -> str:
        return "".join(e[2] for e in self.log if e[0] == "delta" and e[1] == key)

    def finishes(self, key) -> list:
        return [e[3] for e in self.log if e[0] == "delta" and e[1] == key and e[3] is not None]

    def errors(self, key) -> list:
        return [e[2] for e in self.log if e[0] == "error" and e[1] == key]

    def events_after(self, marker, key) -> list:
        at = self.log.index(marker)
        return [e for e in self.log[at + 1:] if e[0] in ("delta", "error") and e[1] == key]


def drive(eng, schedule: dict, rec: Recorder, paths=None, between=None) -> None:
    """Step until every scheduled request has been admitted and every row has ended; `between`
    (step, running) runs before each step."""
    running, step = None, 0
    while running is not None or any(s >= step for s in schedule):
        if between is not None:
            between(step, running)
        running, _ = eng.step(running, schedule.get(step, []), rec.delta, paths, rec.error)
        step += 1


def alone(eng, req: GenRequest, paths=None) -> str:
    return eng.generate([req], paths=paths)[0].text


def prompt(rng) -> list[int]:
    return [rng.randrange(5, 90) for _ in range(rng.randint(1, 10))]


def poison(eng, name: str, value: float) -> None:
    """Make the current version of `name` hold non-finite weights (as a diverged adapter would)."""
    slot = eng.current[name].slot
    with torch.no_grad():
        for p in eng.am.adapter_parameters(slot).values():
            p.fill_(value)


@pytest.fixture(scope="module")
def eng(tiny_model_dir, store):  # noqa: F811
    e = engine_for(tiny_model_dir, max_adapters=6)
    for name in ("a", "b"):
        e.load(name, store / "adapters" / name)
    e.load("nan", store / "adapters" / "a")
    poison(e, "nan", float("nan"))
    e.load("inf", store / "adapters" / "c")
    poison(e, "inf", float("inf"))
    return e


HUGE_SEEDS = [2**64, 2**64 + 17, 2**300, -1, -(2**70), 2**64 - 1]
TINY_TEMPERATURES = [1e-45, 5e-324, 1e-30, 1e-8]


def bad_request(rng, kind: str) -> tuple[GenRequest, str | None]:
    """A request that today's engine could not survive, and what it must end with (None: its text
    as alone; else a fragment of its error)."""
    ids = prompt(rng)
    if kind == "nan_greedy":
        return GenRequest(ids, "nan", Sampling(max_tokens=8, temperature=0)), "not finite"
    if kind == "nan_sampled":
        return GenRequest(ids, "nan", Sampling(max_tokens=8, temperature=1.0, seed=rng.randrange(100))), "not finite"
    if kind == "inf_sampled":
        return GenRequest(ids, "inf", Sampling(max_tokens=8, temperature=0.7, top_p=0.9)), "not finite"
    if kind == "huge_seed":
        return GenRequest(ids, rng.choice(["a", None]), Sampling(max_tokens=8, temperature=1.0,
                                                                 seed=rng.choice(HUGE_SEEDS))), None
    if kind == "tiny_temperature":
        return GenRequest(ids, rng.choice(["b", None]), Sampling(max_tokens=8, temperature=rng.choice(TINY_TEMPERATURES))), None
    if kind == "unknown_adapter":
        return GenRequest(ids, "ghost", Sampling(max_tokens=8, temperature=0)), "not loaded"
    raise ValueError(kind)


KINDS = ["nan_greedy", "nan_sampled", "inf_sampled", "huge_seed", "tiny_temperature", "unknown_adapter"]


@pytest.mark.parametrize("case", range(16))
def test_a_request_that_breaks_ends_alone_while_the_batch_goes_on(eng, case):
    rng = random.Random(case)
    goods = [GenRequest(prompt(rng), rng.choice([None, "a", "b"]),
                        Sampling(max_tokens=rng.randint(18, 28), temperature=rng.choice([0, 0, 0.8]),
                                 seed=rng.randrange(1000))) for _ in range(3)]
    bads = [bad_request(rng, rng.choice(KINDS)) for _ in range(rng.randint(2, 4))]
    schedule = defaultdict(list)
    for i, req in enumerate(goods):
        schedule[rng.randint(0, 2)].append((("good", i), req))
    for i, (req, _) in enumerate(bads):
        schedule[rng.randint(1, 14)].append((("bad", i), req))
    rec = Recorder()
    drive(eng, schedule, rec)
    for i, req in enumerate(goods):
        assert rec.errors(("good", i)) == []
        assert rec.text(("good", i)) == alone(eng, req), (case, i)
        assert len(rec.finishes(("good", i))) == 1
    for i, (req, error) in enumerate(bads):
        key = ("bad", i)
        if error is None:  # a setting that cannot be used as given is made total, not an error
            assert rec.errors(key) == [] and len(rec.finishes(key)) == 1
            greedy = GenRequest(req.prompt_ids, req.adapter, Sampling(max_tokens=8, temperature=0))
            want = alone(eng, req if req.sampling.temperature >= 0.5 else greedy)
            assert rec.text(key) == want, (case, req.sampling)
        else:
            errors = rec.errors(key)
            assert len(errors) == 1 and error in str(errors[0]), (case, req, errors)
            assert rec.finishes(key) == [] and rec.events_after(rec.log[rec.log.index(("error", key, errors[0]))], key) == []
    assert eng.running_rows == 0 and eng.pinned == set()


def test_any_int_seed_samples_repeatably_and_unseeded_draws_leave_torch_alone(eng):
    ids = [5, 6, 7]
    texts = {}
    for seed in [0, 1, 2**63, *HUGE_SEEDS, 2**64 + 1, 10**40]:
        req = GenRequest(ids, "a", Sampling(max_tokens=10, temperature=1.0, seed=seed))
        texts[seed] = alone(eng, req)
        assert alone(eng, req) == texts[seed], seed
        assert 0 <= seed_of(seed) < 2**64
    assert len(set(texts.values())) > len(texts) // 2, "seeds out of range stay distinct"
    assert seed_of(12345) == 12345, "a seed in range is used as given"

    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    outs = [alone(eng, GenRequest(ids, None, Sampling(max_tokens=10, temperature=1.0))) for _ in range(4)]
    assert torch.equal(torch.random.get_rng_state(), state), "no seed: torch's global generator is not reseeded"
    assert len(set(outs)) > 1


def replace_dir(src, dst) -> None:
    """Rewrite an adapter directory in place, as a retrain does (a new directory renamed over it)."""
    tmp = dst.with_name(f".new-{dst.name}")
    shutil.copytree(src, tmp)
    old = dst.with_name(f".old-{dst.name}")
    os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old)


@pytest.mark.parametrize("case", range(4))
def test_a_failed_reload_leaves_the_live_version_and_a_good_one_switches_new_requests(tiny_model_dir, store, tmp_path,  # noqa: F811
                                                                                      case):
    rng = random.Random(case)
    eng = engine_for(tiny_model_dir, max_adapters=3)
    broken = tmp_path / "broken"
    shutil.copytree(store / "adapters" / "a", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"garbage")
    eng.load("hot", store / "adapters" / "a")
    ids = prompt(rng)
    short = lambda: GenRequest(ids, "hot", Sampling(max_tokens=6, temperature=0))  # noqa: E731
    long = GenRequest(prompt(rng), "hot", Sampling(max_tokens=30, temperature=0))
    fail_at, switch_at = rng.randint(1, 5), rng.randint(6, 12)
    want_a = alone(eng, short())
    want_long = alone(eng, long)
    schedule = {s: [(("short", s), short())] for s in range(16)}
    schedule[0].append(("long", long))
    refused = []

    def between(step, running):
        if step == fail_at:
            with pytest.raises(AdapterLoadError, match="adapter 'hot'.*cannot read weights"):
                eng.load("hot", broken)
            refused.append(step)
        if step == switch_at:
            eng.load("hot", store / "adapters" / "b")
            assert len(eng.versions) == 2, "the new version loaded beside the one running rows use"

    rec = Recorder()
    drive(eng, schedule, rec, between=between)
    assert refused and rec.text("long") == want_long and rec.errors("long") == []
    want_b = alone(eng, short())
    assert want_b != want_a
    for s in range(16):
        assert rec.text(("short", s)) == (want_a if s < switch_at else want_b), (case, s)
    assert len(eng.versions) == 1 and len(eng.am.configs) == 1, "the old version left with its last row"


@pytest.mark.parametrize("case", range(4))
def test_a_retrain_in_place_under_steady_traffic_is_served_to_new_requests(tiny_model_dir, store, tmp_path, case):  # noqa: F811
    """The adapter directory is rewritten while rows of the old version are always running: the
    requests admitted after the rewrite get the new weights, the earlier ones finish on the old."""
    rng = random.Random(10 + case)
    eng = engine_for(tiny_model_dir, max_adapters=2)
    live = tmp_path / "store" / "adapters" / "x"
    shutil.copytree(store / "adapters" / "a", live)
    paths = {"x": live}
    ids = prompt(rng)
    req = lambda: GenRequest(ids, "x", Sampling(max_tokens=rng.randint(5, 9), temperature=0))  # noqa: E731
    schedule = {s: [(s, req())] for s in range(20)}
    before = {s: alone(eng, r, paths) for s, [(_, r)] in schedule.items()}
    retrain_at = rng.randint(3, 12)

    def between(step, running):
        if step == retrain_at:
            assert running is not None and running.rows, "traffic never stops"
            replace_dir(store / "adapters" / "b", live)
        assert len(eng.versions) <= 2

    rec = Recorder()
    drive(eng, schedule, rec, paths=paths, between=between)
    after = {s: alone(eng, r, paths) for s, [(_, r)] in schedule.items()}
    assert before != after
    for s in schedule:
        assert rec.text(s) == (before[s] if s < retrain_at else after[s]), (case, s, retrain_at)
    assert len(eng.versions) == 1


def test_unloading_an_adapter_in_use_is_refused_and_changes_nothing(eng):
    reqs = [GenRequest([9, 10, 11], "a", Sampling(max_tokens=12, temperature=0)),
            GenRequest([12], "b", Sampling(max_tokens=12, temperature=0))]
    want = [alone(eng, r) for r in reqs]
    rec = Recorder()

    def between(step, running):
        if step == 3:
            for name in ("a", "b"):
                with pytest.raises(AdapterInUseError, match=f"adapter '{name}' is generating"):
                    eng.unload(name)
                assert name in eng.loaded

    drive(eng, {0: [(0, reqs[0]), (1, reqs[1])], 5: [(2, reqs[0])]}, rec, between=between)
    assert [rec.text(k) for k in (0, 1, 2)] == [want[0], want[1], want[0]]


@pytest.mark.parametrize("case", range(10))
def test_a_cancelled_request_stops_at_once_and_the_others_go_on(eng, case):
    rng = random.Random(100 + case)
    reqs = {k: GenRequest(prompt(rng), rng.choice([None, "a", "b"]), Sampling(max_tokens=rng.randint(10, 25), temperature=0))
            for k in range(6)}
    admit_at = {k: rng.randint(0, 4) for k in reqs}
    schedule = defaultdict(list)
    for k, s in admit_at.items():
        schedule[s].append((k, reqs[k]))
    cancels = defaultdict(list)  # step -> keys cancelled before it
    doomed = rng.sample(sorted(reqs), 3)
    for k in doomed[:2]:
        cancels[rng.randint(admit_at[k], admit_at[k] + 3)].append(k)
    threaded = doomed[2]  # cancelled from another thread, in the middle of a step
    rec = Recorder()

    started = []

    def on_delta(key, text, finish, n):
        rec.delta(key, text, finish, n)
        if n == 2 and not started and key == threaded:  # while the stepping thread is inside a callback
            def cancel():
                eng.cancel(threaded)
                rec.mark("cancelled", threaded)
            started.append(threading.Thread(target=cancel))
            started[0].start()

    running, step = None, 0
    while running is not None or any(s >= step for s in schedule):
        for k in cancels.get(step, []):
            eng.cancel(k)
            rec.mark("cancelled", k)
        running, admitted = eng.step(running, schedule.get(step, []), on_delta, None, rec.error)
        for k in cancels.get(step, []):  # cancelled before the step: not admitted, or gone by its end
            assert k not in {r.key for r in (running.rows if running else [])}
            assert all(row is None for (key, _), row in zip(schedule.get(step, []), admitted) if key == k)
        step += 1
    for t in started:
        t.join()
    for k, req in reqs.items():
        marker = ("cancelled", k)
        if marker in rec.log:
            assert rec.events_after(marker, k) == [], (case, k)
            assert rec.errors(k) == []
        else:
            assert rec.text(k) == alone(eng, req), (case, k)
    assert eng.running_rows == 0 and not eng._cancelled and not eng._keys


def test_a_new_version_waits_for_a_free_slot_while_the_old_one_serves(tiny_model_dir, store, tmp_path):  # noqa: F811
    """Both slots hold versions running rows use when `x` is retrained: new requests for `x` get its
    old version (not an error) until a slot is free, then the new one."""
    eng = engine_for(tiny_model_dir, max_adapters=2)
    live = tmp_path / "adapters" / "x"
    shutil.copytree(store / "adapters" / "a", live)
    paths = {"x": live, "b": store / "adapters" / "b"}
    rng = random.Random(7)
    longs = [GenRequest(prompt(rng), name, Sampling(max_tokens=20, temperature=0)) for name in ("x", "b")]
    short = GenRequest(prompt(rng), "x", Sampling(max_tokens=5, temperature=0))
    old = alone(eng, short, paths)

    def between(step, running):
        if step == 3:
            replace_dir(store / "adapters" / "c", live)

    rec = Recorder()
    drive(eng, {0: [("x", longs[0]), ("b", longs[1])], 4: [("during", short)], 30: [("after", short)]}, rec, paths,
          between)
    new = alone(eng, short, paths)
    assert new != old and rec.errors("during") == []
    assert rec.text("during") == old and rec.text("after") == new


def test_files_that_failed_to_load_are_not_read_again_until_they_change(tiny_model_dir, store, tmp_path, monkeypatch):  # noqa: F811
    """A load runs inside the step every running request waits for: a broken adapter asked for again
    and again fails at once with its first error, and loads once its files are rewritten."""
    import rayft.serving.engine as engine_module

    reads = []
    real = engine_module.load_adapter
    monkeypatch.setattr(engine_module, "load_adapter", lambda am, path, name: reads.append(path) or real(am, path, name))
    eng = engine_for(tiny_model_dir)
    bad = tmp_path / "adapters" / "bad"
    shutil.copytree(store / "adapters" / "a", bad)
    (bad / "adapter_model.safetensors").write_bytes(b"garbage")
    req = GenRequest([5, 6], "bad", Sampling(max_tokens=3, temperature=0))
    rec = Recorder()
    drive(eng, {s: [((s, i), req) for i in range(3)] for s in range(4)}, rec, {"bad": bad})
    errors = [rec.errors((s, i)) for s in range(4) for i in range(3)]
    assert all(len(e) == 1 and "cannot read weights" in str(e[0]) for e in errors) and len(reads) == 1
    replace_dir(store / "adapters" / "a", bad)
    assert eng.generate([req], paths={"bad": bad})[0].token_ids and len(reads) == 2
