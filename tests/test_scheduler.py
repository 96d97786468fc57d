"""The scheduler's pure parts: memory model, fitting, placement, a config's plan. Milliseconds each."""

import random

import peft
import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from rayft.scheduler.memory import GIB, TINYLLAMA_CONFIG, Coefficients, JobShape, ModelShape, estimate, fit
from rayft.scheduler.packing import ReplicaState, Request, never_fits, place, preemption
from rayft.scheduler.plan import make_plan

TINYLLAMA = TINYLLAMA_CONFIG
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=97)


@pytest.mark.parametrize("tied", [False, True])
def test_model_shape_counts_the_parameters_transformers_makes(tied):
    model = LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=tied))
    shape = ModelShape.from_hf_config(model.config.to_dict(), "float32")
    assert shape.params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("variant, targets", [
    ("lora", "all-linear"), ("dora", ["q_proj", "v_proj"]), ("vera", ["q_proj", "o_proj", "down_proj"]),
    ("lora", r"model\.layers\.\d+\.self_attn\.(q|v)_proj"), ("dora", r".*\.1\.mlp\..*_proj")])
def test_adapter_parameter_count_matches_peft(variant, targets):
    """The torch-free Llama shape (the simulator's); any model's: tests/test_model_shape.py."""
    model = LlamaForCausalLM(LlamaConfig(**SMALL))
    if variant == "vera":
        pm = peft.get_peft_model(model, peft.VeraConfig(r=8, target_modules=targets))
    else:
        pm = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=targets, use_dora=variant == "dora"))
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    spec = targets if isinstance(targets, str) else tuple(targets)
    job = JobShape(rank=8, tokens_per_step=128, max_seq_len=64, variant=variant, targets=spec)
    assert job.adapter_params(ModelShape.from_hf_config(model.config.to_dict())) == trainable


def test_tinyllama_r16_all_linear_is_the_known_12_6m():
    shape = ModelShape.from_hf_config(TINYLLAMA)
    assert JobShape(rank=16, tokens_per_step=1024, max_seq_len=512).adapter_params(shape) == 12_615_680
    assert abs(shape.params - 1_100_048_384) < 1  # TinyLlama-1.1B's published count


def test_estimate_grows_with_tokens_rank_and_length():
    m = ModelShape.from_hf_config(TINYLLAMA)
    base = estimate(m, {"a": JobShape(rank=16, tokens_per_step=1024, max_seq_len=512)}).total
    assert estimate(m, {"a": JobShape(rank=16, tokens_per_step=2048, max_seq_len=512)}).total > base
    assert estimate(m, {"a": JobShape(rank=64, tokens_per_step=1024, max_seq_len=512)}).total > base
    assert estimate(m, {"a": JobShape(rank=16, tokens_per_step=1024, max_seq_len=1024)}).total > base
    # a short job beside a long one costs what it costs alone: the fused step pads nobody to the longest
    short = {"s": JobShape(rank=16, tokens_per_step=1024, max_seq_len=128)}
    mixed = {**short, "l": JobShape(rank=16, tokens_per_step=1024, max_seq_len=1024)}
    assert estimate(m, mixed).activations == estimate(m, short).activations + estimate(
        m, {"l": mixed["l"]}).activations


def test_fit_recovers_known_coefficients_and_reports_its_error():
    true = Coefficients(token=20.0, attn=3.0, logit=6.0, workspace=0.7 * GIB)
    m = ModelShape.from_hf_config(TINYLLAMA)
    rng = random.Random(0)
    samples = []
    for _ in range(12):
        jobs = {f"j{i}": JobShape(rank=rng.choice([8, 16, 64]), tokens_per_step=rng.choice([512, 1024, 4096]),
                                  max_seq_len=rng.choice([128, 512, 1024]), loss_fraction=rng.choice([0.3, 1.0]))
                for i in range(rng.randint(1, 6))}
        samples.append((m, jobs, estimate(m, jobs, true).total))
    got = fit(samples)
    assert got.token == pytest.approx(20.0, rel=1e-6) and got.attn == pytest.approx(3.0, rel=1e-6)
    assert got.logit == pytest.approx(6.0, rel=1e-6) and got.workspace == pytest.approx(0.7 * GIB, rel=1e-6)
    assert got.fitted_error < 1e-9
    noisy = [(mm, j, int(p * rng.uniform(0.95, 1.05))) for mm, j, p in samples]
    assert 0.0 < fit(noisy).fitted_error < 0.1
    with pytest.raises(ValueError, match="at least 4"):
        fit(samples[:3])


def test_placement_respects_budgets_spreads_by_free_memory_and_serves_priority_first():
    m = ModelShape.from_hf_config(TINYLLAMA)
    shape = lambda L: JobShape(rank=16, tokens_per_step=4096, max_seq_len=L)  # noqa: E731
    budget = int(0.9 * 80 * GIB)
    replicas = [ReplicaState("r0", m, budget), ReplicaState("r1", m, budget)]
    queue = [Request("l1", shape(4096)), Request("l2", shape(4096), arrival=1),
             Request("s1", shape(128), arrival=2), Request("s2", shape(128), arrival=3)]
    placed, waiting = place(queue, replicas)
    assert not waiting
    # each job goes where the most memory is left once it is placed, lengths mixed (no job is
    # padded to another's length): the long jobs apart, then a short one beside each
    assert placed == {"l1": "r0", "l2": "r1", "s1": "r0", "s2": "r1"}
    assert all(r.peak() <= r.budget for r in replicas)

    tight = [ReplicaState("r0", m, estimate(m, {"x": shape(512)}).total + 1)]  # room for exactly one job
    placed, waiting = place([Request("low", shape(512), priority=0), Request("high", shape(512), priority=5, arrival=9)], tight)
    assert placed == {"high": "r0"} and [r.name for r in waiting] == ["low"]


def test_aging_and_reservation_keep_a_job_from_starving():
    m = ModelShape.from_hf_config(TINYLLAMA)
    small, big = JobShape(rank=8, tokens_per_step=1024, max_seq_len=256), JobShape(rank=16, tokens_per_step=16384, max_seq_len=4096)
    one_big = estimate(m, {"b": big}).total
    # a replica already running a small job: the big one does not fit beside it, a second small one does
    replica = lambda: ReplicaState("r0", m, one_big + 1, {"running": small})  # noqa: E731
    queue = [Request("big", big, arrival=0.0), Request("late-small", small, arrival=50.0)]
    placed, _ = place(queue, [replica()], now=60.0, starve_after_s=100.0)
    assert placed == {"late-small": "r0"}, "before the starvation limit, small jobs backfill around the big one"
    placed, waiting = place(queue, [replica()], now=120.0, starve_after_s=100.0)
    assert placed == {} and [r.name for r in waiting] == ["big", "late-small"], "past it, memory is kept for the big job"

    # aging: a low-priority job that has waited long enough goes before a newly arrived higher one
    tight = lambda: [ReplicaState("r0", m, estimate(m, {"x": small}).total + 1)]  # noqa: E731
    queue = [Request("old-low", small, priority=0, arrival=0.0), Request("new-high", small, priority=1, arrival=290.0)]
    assert place(queue, tight(), now=300.0)[0] == {"new-high": "r0"}, "no aging: priority wins"
    assert place(queue, tight(), now=300.0, aging_s=100.0)[0] == {"old-low": "r0"}, "aged 3 > 1 + 0.1"


def test_preemption_picks_the_fewest_lowest_priority_victims():
    m = ModelShape.from_hf_config(TINYLLAMA)
    small, big = JobShape(rank=8, tokens_per_step=2048, max_seq_len=512), JobShape(rank=16, tokens_per_step=16384, max_seq_len=2048)
    budget = estimate(m, {"b": big}).total + 1
    running = {"a": Request("a", small, priority=0, arrival=1), "b": Request("b", small, priority=0, arrival=2),
               "c": Request("c", small, priority=3, arrival=0), "d": Request("d", small, priority=0, arrival=3)}
    replicas = [ReplicaState("r0", m, budget, {"a": small, "b": small, "c": small}),
                ReplicaState("r1", m, budget, {"d": small})]
    urgent = Request("urgent", big, priority=2, arrival=10)
    assert place([urgent], [ReplicaState(r.name, m, budget, dict(r.jobs)) for r in replicas])[0] == {}
    # c outranks the newcomer, so r0 can only be cleared of a and b, not enough beside c; r1 frees up with d gone
    assert preemption(urgent, replicas, running) == ("r1", ["d"])
    assert preemption(Request("urgent", small, priority=2), replicas, running) is not None
    replicas[1].jobs["e"] = small
    running["e"] = Request("e", small, priority=5, arrival=4)
    assert preemption(urgent, replicas, running) is None, "e outranks it on r1, c on r0"
    assert preemption(Request("low", big, priority=0), replicas, running) is None, "equal priority never preempts"


GPU_GIB = [16, 24, 40, 48, 80, 94, 141]


def test_a_job_fails_as_never_fitting_only_if_no_replica_could_hold_it_alone():
    """Over generated clusters (mixed GPU sizes; replicas free, busy, busy with another base model,
    still starting): a job never fits exactly when placing it on the same replicas, emptied, fails;
    what the replicas run now never changes the answer."""
    m = ModelShape.from_hf_config(TINYLLAMA)
    other = ModelShape.from_hf_config({**TINYLLAMA, "num_hidden_layers": 30})  # another base model
    rng = random.Random(0)
    outcomes = {"wait": 0, "never": 0, "busy-big-one": 0}
    for _ in range(300):
        job = JobShape(rank=rng.choice([8, 16, 64, 256]), tokens_per_step=rng.choice([1024, 8192, 65536, 262144]),
                       max_seq_len=rng.choice([512, 2048, 8192]))
        req = Request("new", job)
        replicas = []
        for i in range(rng.randint(1, 5)):
            budget = int(0.9 * rng.choice(GPU_GIB) * GIB)
            running = {f"r{i}j{k}": JobShape(rank=16, tokens_per_step=4096, max_seq_len=1024)
                       for k in range(rng.choice([0, 0, 1, 3]))}
            replicas.append(ReplicaState(f"r{i}", rng.choice([m, other]) if running else m, budget, running))
        budgets = [r.budget for r in replicas]
        never = never_fits(req, m, budgets)
        emptied = [ReplicaState(r.name, m, r.budget) for r in replicas]
        assert never == (place([req], emptied)[0] == {}), "never fits == fits no replica once it is empty"
        assert never == all(estimate(m, {"new": job}).total > b for b in budgets)
        # a replica still starting (its GPU size unknown) might hold it: wait, never fail
        assert not never_fits(req, m, budgets + [None])
        outcomes["never" if never else "wait"] += 1
        if not never and place([req], [ReplicaState(r.name, r.model, r.budget, dict(r.jobs)) for r in replicas
                                       if r.model is m or not r.jobs])[0] == {}:
            outcomes["busy-big-one"] += 1  # fits nowhere now, yet waits: the case that used to fail
    assert not never_fits(Request("x", JobShape(rank=8, tokens_per_step=8, max_seq_len=8)), m, []), \
        "no replicas yet: the cluster may grow"
    assert min(outcomes.values()) >= 20, outcomes


def test_plan_of_a_config():
    from pathlib import Path

    from rayft.config import load_config

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "tinyllama.yaml")
    plan = make_plan(cfg, ModelShape.from_hf_config(TINYLLAMA), replicas=2, budget_bytes=int(0.9 * 80 * GIB))
    assert set(plan.per_job) == {j.name for j in cfg.jobs} and not plan.never_fit and not plan.waiting
    assert sum(len(r.jobs) for r in plan.replicas) == 3
    small = make_plan(cfg, ModelShape.from_hf_config(TINYLLAMA), replicas=1, budget_bytes=2 * GIB)
    assert set(small.never_fit) == {j.name for j in cfg.jobs}  # 2.2 GB of weights alone exceed 2 GiB


def test_plan_command(tmp_path, capsys):
    from pathlib import Path

    import yaml

    from rayft.cli import main

    root = Path(__file__).resolve().parent.parent
    cfg = yaml.safe_load((root / "configs" / "demo.yaml").read_text())
    cfg["base_model"]["path"] = str(tmp_path / "tiny")
    for ds in cfg["datasets"]:
        ds["path"] = str(root / "configs" / ds["path"])
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["plan", str(tmp_path / "demo.yaml"), "--memory-gib", "24", "--replicas", "2"]) == 0
    out = capsys.readouterr().out
    assert "replica-0" in out and "length" in out and "never fit" not in out
    assert main(["plan", str(tmp_path / "demo.yaml"), "--memory-gib", "1"]) == 1
    assert "never fit a 0.90 GiB budget: length, earliest, latest" in capsys.readouterr().out

    # a measured fit (benchmarks/memory_model.py --json) replaces the default coefficients
    import json

    fitted = tmp_path / "fit.json"
    fitted.write_text(json.dumps({"coefficients": {"token": 17.0, "attn": 1.0, "logit": 8.0, "workspace": 0.0,
                                                   "fitted_error": 0.04}}))
    assert main(["plan", str(tmp_path / "demo.yaml"), "--memory-gib", "1", "--coefficients", str(fitted)]) == 0
    out = capsys.readouterr().out
    assert f"coefficients fitted in {fitted}" in out and "max error 4.0%" in out
    fitted.write_text("{}")
    assert main(["plan", str(tmp_path / "demo.yaml"), "--coefficients", str(fitted)]) == 2
    assert "not a memory-model fit" in capsys.readouterr().out

    # staged replicas: each stage's layers and estimate; auto takes the fewest stages that fit
    assert main(["plan", str(tmp_path / "demo.yaml"), "--stages", "3"]) == 0
    out = capsys.readouterr().out
    assert "3 pipeline stage(s) (asked)" in out and "│ 2     │ 3-3" in out
    assert main(["plan", str(tmp_path / "demo.yaml"), "--memory-gib", "2", "--stages", "auto",
                 "--coefficients", str(tmp_path / "fit0.json")]) == 2  # a missing fit file: a clear error
    capsys.readouterr()
    assert main(["plan", str(tmp_path / "demo.yaml"), "--stages", "auto"]) == 0
    assert "1 pipeline stage(s) (auto: the fewest whose every stage fits" in capsys.readouterr().out
    assert main(["plan", str(tmp_path / "demo.yaml"), "--memory-gib", "0.5", "--stages", "auto"]) == 1
    assert "no stage count fits all jobs in a 0.45 GiB budget per stage" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["plan", str(tmp_path / "demo.yaml"), "--stages", "0"])


def test_plan_sizes_regex_targets_on_a_non_llama_model_as_peft_does(tmp_path, capsys):
    """`rayft plan` on a Qwen2 model dir: a regex target is sized from the real module tree (it was 0),
    targets that select nothing are named, and a model that cannot be read is a clear error."""
    import yaml
    from transformers import AutoModelForCausalLM, Qwen2Config

    from rayft.cli import main
    from rayft.config import load_config
    from rayft.model.shape import model_shape
    from rayft.scheduler.memory import adapter_bytes
    from rayft.scheduler.plan import job_shapes

    config = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97)
    config.save_pretrained(tmp_path / "qwen")  # config.json is all the planner reads
    regex = r"model\.layers\.[12]\.(self_attn\.(q|v)_proj|mlp\.down_proj)"
    run = {"base_model": {"path": str(tmp_path / "qwen"), "dtype": "float32"},
           "adapters": [{"name": "a", "r": 8, "target_modules": regex}],
           "datasets": [{"name": "d", "path": "d.jsonl"}],
           "jobs": [{"adapter": "a", "dataset": "d", "steps": 1, "tokens_per_micro_batch": 256, "max_seq_len": 64}]}
    (tmp_path / "d.jsonl").write_text('{"instruction": "x", "output": "y"}\n')
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    cfg = load_config(tmp_path / "run.yaml")
    plan = make_plan(cfg, model_shape(cfg.base_model), replicas=1, budget_bytes=8 * GIB)
    expected = peft.get_peft_model(AutoModelForCausalLM.from_config(config), peft.LoraConfig(
        r=8, target_modules=regex)).get_nb_trainable_parameters()[0]
    assert expected > 0 and job_shapes(cfg)["a"].adapter_params(plan.model) == expected
    assert plan.per_job["a"].adapters == {"a": adapter_bytes(job_shapes(cfg)["a"], plan.model)}
    assert main(["plan", str(tmp_path / "run.yaml")]) == 0 and "never fit" not in capsys.readouterr().out

    run["adapters"][0]["target_modules"] = ["gate_up_proj", "fc1"]  # other families' names
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    assert main(["plan", str(tmp_path / "run.yaml")]) == 1
    assert "target_modules ['gate_up_proj', 'fc1'] select no linear layer" in capsys.readouterr().out.replace("\n", "")

    (tmp_path / "not-a-model").mkdir()
    run["base_model"]["path"] = str(tmp_path / "not-a-model")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    assert main(["plan", str(tmp_path / "run.yaml")]) == 2
    assert f"base model {tmp_path / 'not-a-model'}: cannot read its config" in capsys.readouterr().out.replace("\n", "")


def test_the_scheduler_imports_neither_torch_nor_ray():
    """It plans from module shapes handed to it (rayft.model.shape reads them), so it stays pure."""
    import subprocess
    import sys

    code = ("import sys, rayft.scheduler.plan, rayft.scheduler.simulate, rayft.targets\n"
            "print(sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.strip() == "[]"


def test_plan_says_what_all_linear_leaves_out_of_an_moe_model(tmp_path, capsys):
    """Mixtral's router and fused experts are no linear layers an adapter can take: `rayft plan`
    lists them, per layer pattern, when an adapter asks for all-linear, and not otherwise."""
    import yaml
    from transformers import MixtralConfig

    from rayft.cli import main

    MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=97, num_local_experts=4).save_pretrained(tmp_path / "moe")
    (tmp_path / "d.jsonl").write_text('{"instruction": "x", "output": "y"}\n')
    run = {"base_model": {"path": str(tmp_path / "moe"), "dtype": "float32"},
           "adapters": [{"name": "a", "r": 4, "target_modules": "all-linear"}],
           "datasets": [{"name": "d", "path": "d.jsonl"}],
           "jobs": [{"adapter": "a", "dataset": "d", "steps": 1, "tokens_per_micro_batch": 256, "max_seq_len": 64}]}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    assert main(["plan", str(tmp_path / "run.yaml")]) == 0
    out = capsys.readouterr().out.replace("\n", " ")
    assert "all-linear leaves out" in out
    assert "model.layers.*.mlp.gate (3×)" in out and "model.layers.*.mlp.experts (3×)" in out
    assert "fused expert weights" in out

    run["adapters"][0]["target_modules"] = ["q_proj", "v_proj"]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    assert main(["plan", str(tmp_path / "run.yaml")]) == 0
    assert "leaves out" not in capsys.readouterr().out
