"""Every model family PEFT supports, on tiny random configs built from transformers' config classes:
rayft's logits equal PEFT's for the same adapter, a job trained beside another equals it trained
alone (losses and weights), and greedy serving of a mixed batch equals each adapter merged.
Cases are drawn from a seed over families x (targets, variant, rank); seconds in all."""

import copy
import random
import warnings

import peft
import pytest
import torch
import transformers
from transformers import AutoTokenizer

from rayft.adapters import AdapterModel, RoutingError, Segment, save_adapter
from rayft.adapters.model import left_out_of_all_linear
from rayft.config import AdapterConfig, BaseModelConfig
from rayft.model.load import load_base_model, supported_attention
from rayft.serving.engine import GenerationEngine, GenRequest, Sampling
from rayft.train.evaluate import greedy_generate

VOCAB = 61
_ATTN = dict(num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64)
# dropout-free configs: the base's own dropout would make fused and alone differ by its draws
FAMILIES = {
    "llama": (transformers.LlamaConfig, dict(hidden_size=32, intermediate_size=48, num_key_value_heads=2, **_ATTN)),
    "qwen2": (transformers.Qwen2Config, dict(hidden_size=32, intermediate_size=40, num_key_value_heads=2, **_ATTN)),
    "mistral": (transformers.MistralConfig, dict(hidden_size=32, intermediate_size=56, num_key_value_heads=1, **_ATTN)),
    "gemma2": (transformers.Gemma2Config, dict(hidden_size=32, intermediate_size=48, num_key_value_heads=2,
                                               head_dim=8, **_ATTN)),
    "gemma3": (transformers.Gemma3TextConfig, dict(hidden_size=32, intermediate_size=48, num_key_value_heads=2,
                                                   head_dim=8, sliding_window=8, **_ATTN)),
    "phi3": (transformers.Phi3Config, dict(hidden_size=32, intermediate_size=48, num_key_value_heads=2,
                                           pad_token_id=0, **_ATTN)),
    "gpt_neox": (transformers.GPTNeoXConfig, dict(hidden_size=32, intermediate_size=48, hidden_dropout=0.0,
                                                  attention_dropout=0.0, **_ATTN)),
    "mixtral": (transformers.MixtralConfig, dict(hidden_size=32, intermediate_size=48, num_key_value_heads=2,
                                                 num_local_experts=4, num_experts_per_tok=2, **_ATTN)),
    "qwen2_moe": (transformers.Qwen2MoeConfig, dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                                                    shared_expert_intermediate_size=40, num_key_value_heads=2,
                                                    num_experts=4, num_experts_per_tok=2, **_ATTN)),
    "opt": (transformers.OPTConfig, dict(hidden_size=32, ffn_dim=48, word_embed_proj_dim=32, dropout=0.0,
                                         attention_dropout=0.0, **_ATTN)),
    "gpt2": (transformers.GPT2Config, dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
}


def build(family: str, vocab: int = VOCAB, seed: int = 0):
    cls, kwargs = FAMILIES[family]
    config = cls(**{**kwargs, "vocab_size": vocab})
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).float().eval()


def draw_case(rng: random.Random, names: list[str]) -> dict:
    """An adapter: all-linear or a random subset of the layer kinds, a variant, a rank (some above
    the smallest layer's size, as Qwen2-MoE's 32 -> 1 shared_expert_gate)."""
    kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
    targets = "all-linear" if rng.random() < 0.5 else rng.sample(kinds, rng.randint(1, len(kinds)))
    return dict(targets=targets, variant=rng.choice(["lora", "rslora", "dora", "vera"]), r=rng.choice([1, 2, 4, 8, 40]))


def rayft_config(name: str, case: dict) -> AdapterConfig:
    variant = "lora" if case["variant"] == "rslora" else case["variant"]
    return AdapterConfig(name=name, variant=variant, r=case["r"], alpha=2 * case["r"],
                         use_rslora=case["variant"] == "rslora", target_modules=case["targets"], vera_seed=7)


def randomize(am: AdapterModel, name: str, seed: int, scale: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in am.adapter_parameters(name).values():
            p.add_(torch.randn(p.shape, generator=g) * scale)


CASES = [(family, seed) for seed in range(3) for family in FAMILIES]


@pytest.mark.parametrize("family,seed", CASES)
def test_peft_gives_rayft_logits(family, seed, tmp_path):
    rng = random.Random(f"{family}{seed}")
    model = build(family)
    reference = copy.deepcopy(model)
    am = AdapterModel(model)
    case = draw_case(rng, am.linear_names())
    am.add_adapter(rayft_config("a", case), seed=seed)
    randomize(am, "a", seed)
    save_adapter(am, "a", tmp_path / "a")
    ids = torch.randint(0, VOCAB, (3, rng.randint(2, 12)), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), am.use("a", rows=3):
        ours = model(ids).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(reference, tmp_path / "a").eval()
    # PEFT corrects a wrong fan_in_fan_out with a warning: the saved config must already be right
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)], (family, case)
    # PEFT's all-linear picks the same linear layers as rayft's. Left out, on purpose: the fused 3-D
    # expert weights and the router PEFT adds by parameter (`target_parameters`, Mixtral here); an
    # expert sees a gathered subset of tokens, which no row segment can be mapped to.
    if case["targets"] == "all-linear":
        wanted = peft.get_peft_model(build(family), peft.LoraConfig(r=1, target_modules="all-linear"))
        by_module = {n.removeprefix("base_model.model.") for n, m in wanted.named_modules()
                     if isinstance(m, peft.tuners.lora.LoraLayer) and not isinstance(m, peft.tuners.lora.ParamWrapper)}
        assert by_module == set(am.layers()), family
        by_parameter = set(wanted.peft_config["default"].target_parameters or ())
        assert by_parameter == ({"gate_up_proj", "down_proj", "gate.weight"} if family == "mixtral" else set())
        # and rayft says which it leaves out, and why: every MoE router and fused expert stack
        left = left_out_of_all_linear(am.model)
        moe = {f"model.layers.{i}.mlp.{m}" for i in range(2) for m in ("gate", "experts")}
        assert set(left) == (moe if family in ("mixtral", "qwen2_moe") else set()), (family, left)
        assert all("fused expert weights" in why for n, why in left.items() if n.endswith("experts"))
    with torch.no_grad():
        theirs = pm(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4, msg=lambda m: f"{family} {case}: {m}")


def train(am: AdapterModel, jobs: dict[str, torch.Tensor], steps: int = 3):
    """A few SGD steps of each job on its own rows of one fused batch: per-job losses, by step."""
    model = am.model
    order = list(jobs)
    ids = torch.cat([jobs[n] for n in order])
    segments, row = [], 0
    for n in order:
        segments.append(Segment(n, row, row + len(jobs[n])))
        row += len(jobs[n])
    # SGD: Adam would blow float noise in near-zero gradients (other batch sizes, other sums) up to lr
    opts = {n: torch.optim.SGD(am.adapter_parameters(n).values(), lr=0.1) for n in order}
    history = []
    for _ in range(steps):
        with am.route(segments):
            logits = model(ids).logits.float()
        losses = {s.adapter: torch.nn.functional.cross_entropy(
            logits[s.start : s.stop, :-1].reshape(-1, logits.shape[-1]), ids[s.start : s.stop, 1:].reshape(-1))
            for s in segments}
        sum(losses.values()).backward()
        for opt in opts.values():
            opt.step()
            opt.zero_grad()
        history.append({n: v.item() for n, v in losses.items()})
    return history


@pytest.mark.parametrize("family,seed", CASES[: len(FAMILIES) * 2])
def test_a_job_trained_beside_another_equals_it_trained_alone(family, seed):
    """Both jobs change every layer they target (B starts non-zero), so an adapter reaching the
    other job's tokens, or missing its own, moves its loss and its neighbour's."""
    rng = random.Random(f"fused{family}{seed}")
    g = torch.Generator().manual_seed(seed)
    width = rng.randint(3, 10)
    jobs = {"a": torch.randint(0, VOCAB, (rng.randint(1, 3), width), generator=g),
            "b": torch.randint(0, VOCAB, (rng.randint(1, 3), width), generator=g)}

    def fresh(names):
        am = AdapterModel(build(family))
        for k, n in enumerate(names):
            am.add_adapter(rayft_config(n, draw_case(random.Random(f"{family}{seed}{n}"), am.linear_names())), seed=k)
            randomize(am, n, seed=10 + k)
        return am

    fused = fresh(["a", "b"])
    together = train(fused, jobs)
    for n in jobs:
        alone = fresh(["a", "b"])  # same init; only `n` is routed
        history = train(alone, {n: jobs[n]})
        assert [h[n] for h in together] == pytest.approx([h[n] for h in history], rel=1e-5, abs=1e-6), (family, n)
        for k, p in alone.adapter_parameters(n).items():
            torch.testing.assert_close(fused.adapter_parameters(n)[k], p, atol=1e-5, rtol=1e-4, msg=f"{family} {k}")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_serving_of_a_mixed_batch_equals_each_adapter_merged(family, tokenizer, tmp_path):
    vocab = len(tokenizer)
    engine = GenerationEngine(build(family, vocab), tokenizer)
    ref = AdapterModel(build(family, vocab))
    rng = random.Random(family)
    for k, name in enumerate(["a", "b"]):
        ref.add_adapter(rayft_config(name, draw_case(rng, ref.linear_names())), seed=k)
        randomize(ref, name, seed=k, scale=0.5)
        save_adapter(ref, name, tmp_path / name)
        engine.load(name, tmp_path / name)
    prompts = ["hello there", "abc", "the quick brown fox", "xyz xyz", "a b c d"]
    which = ["a", None, "b", "a", "b"]
    outs = engine.generate([GenRequest(tokenizer.encode(p), w, Sampling(max_tokens=6, temperature=0))
                            for p, w in zip(prompts, which)])
    for p, w, out in zip(prompts, which, outs):
        if w is None:
            want = greedy_generate(ref, tokenizer, [tokenizer.encode(p)], None, 6)[0]
        else:
            with ref.merged(w):
                want = greedy_generate(ref, tokenizer, [tokenizer.encode(p)], None, 6)[0]
        assert out.text == want, (family, p, w)


class GatheringLM(torch.nn.Module):
    """A toy LM whose `picked` linear sees a gathered subset of tokens (as an MoE expert does):
    no shape of its input says which row a token came from."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 16)
        self.proj = torch.nn.Linear(16, 16)
        self.picked = torch.nn.Linear(16, 16)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, ids):
        h = self.proj(self.embed(ids))
        flat = h.reshape(-1, 16)
        keep = (ids.reshape(-1) % 2 == 0).nonzero().squeeze(1)
        return flat.index_add(0, keep, self.picked(flat[keep])).view_as(h)


def test_a_layer_whose_input_cannot_be_mapped_to_tokens_is_refused_by_name():
    model = GatheringLM()
    reference = copy.deepcopy(model)
    am = AdapterModel(model)
    for k, n in enumerate("ab"):
        am.add_adapter(AdapterConfig(name=n, r=2, alpha=8, target_modules=["picked", "proj"]), seed=k)
        randomize(am, n, k)
    ids = torch.arange(VOCAB - 1).view(4, -1)[:, :7] * 3 % VOCAB  # an odd count of even ids: no shape matches
    with pytest.raises(RoutingError, match=r"layer picked: its input of shape \(\d+, 16\) does not map"):
        with am.route([Segment("a", 0, 2), Segment("b", 2, 4)]):
            model(ids)
    # one adapter over the whole batch applies to whatever the layer sees, as PEFT does
    save = {k: v.clone() for k, v in am.adapter_state("a").items()}
    pm = peft.get_peft_model(reference, peft.LoraConfig(r=2, lora_alpha=8, target_modules=["picked", "proj"]))
    with torch.no_grad():
        for k, v in save.items():
            mod, tensor = k.rsplit(".", 1)
            getattr(pm.base_model.model.get_submodule(mod), tensor)["default"].weight.copy_(v)
    with torch.no_grad(), am.use("a", rows=4):
        torch.testing.assert_close(model(ids), pm(ids))


def test_a_model_without_sdpa_is_built_with_eager_attention(tiny_model_dir, tmp_path):
    build("gemma2", len(AutoTokenizer.from_pretrained(tiny_model_dir))).save_pretrained(tmp_path / "g")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "g")
    model, _ = load_base_model(BaseModelConfig(path=str(tmp_path / "g"), device="cpu", dtype="float32"))
    assert model.config._attn_implementation == "eager"
    llama = transformers.LlamaConfig(**FAMILIES["llama"][1])
    assert supported_attention(llama, "sdpa") == "sdpa" and supported_attention(llama, "eager") == "eager"
    with pytest.raises(ValueError, match="model_type 'vit'"):
        supported_attention(transformers.ViTConfig(), "sdpa")


def test_a_peft_adapter_on_fused_moe_experts_is_refused_naming_its_target_parameters(tmp_path):
    from rayft.adapters import AdapterError, load_adapter

    pm = peft.get_peft_model(build("mixtral"), peft.LoraConfig(r=2, target_modules="all-linear"))
    pm.save_pretrained(tmp_path / "p")
    am = AdapterModel(build("mixtral"))
    with pytest.raises(AdapterError, match=r"adapter_config.json: target_parameters \['down_proj', 'gate.weight', "
                                           r"'gate_up_proj'\] \(LoRA on weights outside linear layers"):
        load_adapter(am, tmp_path / "p", "p")
    assert not am.configs and not am.layers()


def _loss_example_by_example(am: AdapterModel, name: str, batch) -> float:
    """A packed batch's loss (token mean) with each example run alone through the model, adapter on."""
    total, count = 0.0, 0
    with torch.no_grad(), am.use(name, rows=1):
        for ids, targets, seq in zip(batch.input_ids, batch.targets, batch.seq_ids):
            for s in seq.unique().tolist():
                if s >= 0:
                    keep = seq == s
                    logits = am.model(input_ids=ids[keep][None]).logits[0].float()
                    total += float(torch.nn.functional.cross_entropy(logits, targets[keep], reduction="sum"))
                    count += int((targets[keep] != -100).sum())
    return total / count


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_fused_step_gives_each_job_its_loss_on_every_family(family):
    """The engine's padding-free stream on each family: two jobs of packed examples of different
    lengths in one fused step; each job's loss equals its examples run one by one through the model
    with its adapter (so the variable-length attention keeps examples apart, positions restart, and
    routing by token holds, on each family's own attention, positions and layer shapes). With the
    attention's buckets spanning whole jobs instead of examples, every family fails it."""
    import copy

    from rayft.config import JobConfig, OptimizerConfig
    from rayft.data import Encoded, Packer
    from rayft.train.engine import FusedEngine
    from rayft.train.job import Job

    rng = random.Random(f"stream{family}")
    am = AdapterModel(build(family))  # the configs have no dropout: train and eval mode agree
    jobs = []
    for k, (name, row) in enumerate((("a", 24), ("b", 40))):
        cfg = rayft_config(name, draw_case(random.Random(f"{family}{name}"), am.linear_names()))
        examples = [Encoded([rng.randrange(VOCAB) for _ in range(n)], [t >= n // 2 for t in range(n)])
                    for n in (rng.randint(3, row // 2) for _ in range(8))]
        jc = JobConfig(name=name, adapter=name, dataset="d", steps=1, max_seq_len=row, tokens_per_micro_batch=2 * row,
                       seed=k, optimizer=OptimizerConfig(name="sgd", lr=1e-3))
        jobs.append(Job.create(jc, cfg, am, Packer(examples, row, 2, seed=k)))
        randomize(am, name, seed=10 + k)
    # the batches the step will draw, scored before it moves the weights
    want = {j.name: _loss_example_by_example(am, j.name, copy.deepcopy(j.packer).next_batch()) for j in jobs}
    stats = FusedEngine(am, "cpu").micro_step(jobs)
    for j in jobs:
        assert stats.records[j.name].loss == pytest.approx(want[j.name], rel=1e-5, abs=1e-6), (family, j.name)
