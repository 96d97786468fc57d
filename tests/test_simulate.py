"""The trace simulator: rayft's placement against mLoRA's FIFO policy. Pure Python, seconds."""

import json
from pathlib import Path

import pytest

from rayft.scheduler.memory import TINYLLAMA_CONFIG, ModelShape
from rayft.scheduler.simulate import (
    DEFAULT_BUDGET,
    Throughput,
    TraceError,
    TraceJob,
    compare,
    load_trace,
    simulate,
)

TINYLLAMA = ModelShape.from_hf_config(TINYLLAMA_CONFIG)
TRACE = Path(__file__).resolve().parent.parent / "configs" / "traces" / "mixed.jsonl"
SLOW = Throughput(floor_s=0.0, peak_tokens_per_s=1000.0)  # 1 s per 1000 tokens: easy arithmetic


def job(name, max_len, lens, tokens, mbt, arrival=0.0, rank=16, priority=0):
    return TraceJob(name=name, arrival=arrival, rank=rank, max_seq_len=max_len, seq_lens=tuple(lens),
                    tokens=tokens, priority=priority, micro_batch_tokens=mbt)


# a: 2 rows of 512-token examples per step, 10 steps; b: 2 rows of 128-token examples (256 real per step)
TINY = [job("a", 512, [512], 10 * 1024, 1024), job("b", 512, [128], 10 * 256, 1024)]


def test_tiny_trace_makespans_by_hand():
    # rayft packs b's examples into full 512-token rows: b needs 3 steps (1024, 1024, 512 real tokens)
    # beside a's ten 1024-token steps: 2 × 2.048 s + 1.536 s + 7 × 1.024 s = 12.8 s, no padding.
    r = simulate(TINY, "rayft", 1, TINYLLAMA, DEFAULT_BUDGET, SLOW)
    assert r.makespan == pytest.approx(12.8) and r.padding_fraction == 0.0 and r.predicted_ooms == 0
    assert r.completion == pytest.approx({"b": 2 * 2.048 + 1.536, "a": 12.8})
    assert r.utilisation == pytest.approx(1.0)
    # mLoRA padding per job: b's 128-token rows stay 128 (10 steps of 1024 + 256 = 1.28 s): 12.8 s as well
    m = simulate(TINY, "mlora", 1, TINYLLAMA, DEFAULT_BUDGET, SLOW)
    assert m.makespan == pytest.approx(12.8) and m.padding_fraction == 0.0
    # mLoRA padding the fused batch to its longest sequence (its dispatcher): b's rows become 512
    f = simulate(TINY, "mlora", 1, TINYLLAMA, DEFAULT_BUDGET, SLOW, pad_scope="fused")
    assert f.makespan == pytest.approx(20.48) and f.padding_fraction == pytest.approx(768 / 2048)
    # one job at a time, FIFO: a (10 × 1.024 s) then b (10 × 0.256 s); b waits for a
    c1 = simulate(TINY, "mlora", 1, TINYLLAMA, DEFAULT_BUDGET, SLOW, concurrency=1)
    assert c1.completion == pytest.approx({"a": 10.24, "b": 12.8}) and c1.mean_jct == pytest.approx(11.52)
    # the launch floor: a lone 1024-token step costs max(0.07 s, 1024 / rate)
    fast = Throughput(floor_s=0.07, peak_tokens_per_s=1e6)
    assert simulate([TINY[0]], "rayft", 1, TINYLLAMA, DEFAULT_BUDGET, fast).makespan == pytest.approx(0.7)


def test_arrivals_and_two_replicas():
    late = [job("a", 512, [512], 4096, 1024), job("b", 512, [512], 4096, 1024, arrival=100.0)]
    for policy in ("rayft", "mlora"):
        r = simulate(late, policy, 2, TINYLLAMA, DEFAULT_BUDGET, SLOW)
        assert r.completion == pytest.approx({"a": 4.096, "b": 104.096})
        assert r.makespan == pytest.approx(104.096) and r.mean_jct == pytest.approx(4.096)


def test_rayft_never_exceeds_the_budget_where_mlora_predicts_ooms():
    # 32k-token micro-batches of 4096-token rows: each fits a replica alone (~58 GiB), no two together
    heavy = [job(f"h{i}", 4096, [4096], 65536, 32768, arrival=float(i)) for i in range(4)]
    r, m = compare(heavy, 2, TINYLLAMA, DEFAULT_BUDGET, SLOW)
    assert r.predicted_ooms == 0 and r.max_peak_bytes <= DEFAULT_BUDGET and not r.never_fit
    assert m.predicted_ooms > 0 and m.max_peak_bytes <= DEFAULT_BUDGET  # the OOMing sets never ran
    assert set(r.completion) == set(m.completion) == {f"h{i}" for i in range(4)}
    # a job that cannot fit an empty replica is reported, not queued forever
    huge = heavy + [job("huge", 4096, [4096], 65536, 4 * 32768)]
    r = simulate(huge, "rayft", 2, TINYLLAMA, DEFAULT_BUDGET, SLOW)
    assert r.never_fit == ["huge"] and "huge" not in r.completion and len(r.completion) == 4


def test_mlora_pads_more_on_mixed_lengths_and_is_deterministic():
    mixed = [TraceJob(f"j{i}", float(i), 16, L, (64, L), 200_000, micro_batch_tokens=4096, seq_range=True)
             for i, L in enumerate([256, 512, 1024, 2048, 4096, 512, 1024, 256])]
    r, m = compare(mixed, 2, TINYLLAMA, seed=3)
    assert m.padding_fraction > r.padding_fraction and m.padding_fraction > 0.2
    r2, m2 = compare(mixed, 2, TINYLLAMA, seed=3)
    assert (r2.makespan, m2.makespan, m2.padding_fraction) == (r.makespan, m.makespan, m.padding_fraction)
    assert r.real_tokens == m.real_tokens == 8 * 200_000


def test_a_malformed_trace_line_is_named(tmp_path):
    good = {"name": "a", "arrival": 0, "rank": 8, "max_seq_len": 512, "seq_lens": [100, 512], "tokens": 1000}
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps(good) + "\n\n# a comment\n" + "{not json\n")
    with pytest.raises(TraceError, match=r"t\.jsonl:4: not valid JSON"):
        load_trace(p)
    cases = [({**good, "seq_lens": [100, 600]}, r"in \[1, max_seq_len=512\]"),
             ({k: v for k, v in good.items() if k != "tokens"}, r"missing field\(s\) \['tokens'\]"),
             ({**good, "rank": "8"}, r"'rank' must be an integer"),
             ({**good, "seq_lens": {"min": 64}}, r"exactly 'min' and 'max'"),
             ({**good, "epochs": 3}, r"unknown field"),
             (good, r"job name 'a' already used on line 1")]
    for bad, msg in cases:
        p.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(TraceError, match=rf"t\.jsonl:2: .*{msg}"):
            load_trace(p)
    p.write_text(json.dumps({**good, "seq_lens": {"min": 64, "max": 512}}) + "\n")
    assert load_trace(p)[0].seq_range and load_trace(p)[0].micro_batch_tokens == 4096
    with pytest.raises(TraceError, match="no jobs"):
        p.write_text("\n")
        load_trace(p)


def test_shipped_trace_meets_the_target_on_two_replicas():
    trace = load_trace(TRACE)
    assert 35 <= len(trace) <= 45
    assert {j.rank for j in trace} <= {8, 16, 32, 64} and min(j.max_seq_len for j in trace) <= 512
    assert max(j.max_seq_len for j in trace) == 4096
    r, m = compare(trace, 2, TINYLLAMA, DEFAULT_BUDGET, Throughput())
    assert r.predicted_ooms == 0 and r.max_peak_bytes <= DEFAULT_BUDGET and not r.never_fit
    assert len(r.completion) == len(m.completion) == len(trace)
    assert m.padding_fraction > r.padding_fraction
    assert m.makespan / r.makespan >= 1.3, (r.summary(), m.summary())


def test_shipped_trace_is_what_the_generator_writes():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_trace", TRACE.with_name("make_trace.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert [json.loads(line) for line in TRACE.read_text().splitlines()] == mod.make(0)


def test_simulate_command_prints_both_policies_and_the_ratio(capsys):
    from rayft.cli import main

    assert main(["simulate", str(TRACE)]) == 0
    out = capsys.readouterr().out
    assert "rayft (memory-aware packing)" in out and "mLoRA (FIFO, 4 per replica, padded)" in out
    assert "makespan: mLoRA's policy / rayft's = " in out
    bad = TRACE.parent / "missing.jsonl"
    assert main(["simulate", str(bad)]) == 2
