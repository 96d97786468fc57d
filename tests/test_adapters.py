"""The multi-adapter layer: PEFT parity both ways, routing isolation, batching, merge, errors."""

import copy
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from rayft.adapters import AdapterError, AdapterModel, Segment, load_adapter, save_adapter
from rayft.config import AdapterConfig


def small_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def randomize(am: AdapterModel, name: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in am.adapter_parameters(name).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 else 0.0))


PEFT_CASES = {
    "lora": (AdapterConfig(name="a", r=4, alpha=8), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")),
    "rslora": (
        AdapterConfig(name="a", r=8, alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
        peft.LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    ),
    "dora": (
        AdapterConfig(name="a", variant="dora", r=4, alpha=8, target_modules=["q_proj", "o_proj", "up_proj"]),
        peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "o_proj", "up_proj"]),
    ),
    "vera": (
        AdapterConfig(name="a", variant="vera", r=8, target_modules=["q_proj", "o_proj", "down_proj"], vera_seed=3),
        peft.VeraConfig(r=8, target_modules=["q_proj", "o_proj", "down_proj"], projection_prng_key=3),
    ),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_rayft_adapter_loads_in_peft_with_same_logits(case, tmp_path):
    ours, _ = PEFT_CASES[case]
    base = small_llama()
    reference = copy.deepcopy(base)
    am = AdapterModel(base)
    am.add_adapter(ours)
    randomize(am, "a", seed=1)
    save_adapter(am, "a", tmp_path / "a")
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad(), am.use("a", rows=2):
        our_logits = base(ids).logits

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(reference, tmp_path / "a").eval()
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    theirs = peft.get_peft_model_state_dict(pm)
    assert set(theirs) == set(saved)
    with torch.no_grad():
        peft_logits = pm(ids).logits
    torch.testing.assert_close(our_logits, peft_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_adapter_loads_in_rayft_with_same_logits(case, tmp_path):
    _, theirs = PEFT_CASES[case]
    base = small_llama()
    pm = peft.get_peft_model(copy.deepcopy(base), theirs)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    pm.eval().save_pretrained(tmp_path / "p")
    ids = torch.randint(0, 97, (3, 9))
    with torch.no_grad():
        want = pm(ids).logits

    am = AdapterModel(base)
    cfg = load_adapter(am, tmp_path / "p", "p")
    assert cfg.variant == {"dora": "dora", "vera": "vera"}.get(case, "lora")
    with torch.no_grad(), am.use("p", rows=3):
        got = base(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # and it trains on: gradients reach its parameters
    am.set_trainable("p", True)
    with am.use("p", rows=3):
        base(ids).logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in am.adapter_parameters("p").values())


def mixed_adapters():
    return [
        AdapterConfig(name="l4", r=4, alpha=8),
        AdapterConfig(name="l4b", r=4, alpha=16, target_modules=["q_proj", "v_proj"]),
        AdapterConfig(name="rs8", r=8, alpha=8, use_rslora=True),
        AdapterConfig(name="dora", variant="dora", r=4),
        AdapterConfig(name="vera", variant="vera", r=8, target_modules=["k_proj", "up_proj"]),
        AdapterConfig(name="l4c", r=4, alpha=4),
    ]


def test_each_segment_sees_only_its_own_adapter():
    base = small_llama()
    am = AdapterModel(base)
    cfgs = mixed_adapters()
    for i, c in enumerate(cfgs):
        am.add_adapter(c)
        randomize(am, c.name, seed=10 + i)
    ids = torch.randint(0, 97, (2 * len(cfgs) + 1, 8))
    segs = [Segment(c.name, 2 * i, 2 * i + 2) for i, c in enumerate(cfgs)]  # last row: base only
    with torch.no_grad(), am.route(segs):
        fused = base(ids).logits
    with torch.no_grad():
        for s in segs:
            with am.use(s.adapter, rows=2):
                alone = base(ids[s.start : s.stop]).logits
            torch.testing.assert_close(fused[s.start : s.stop], alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fused[-1:], base(ids[-1:]).logits, atol=1e-5, rtol=1e-5)


def test_batched_bmm_path_equals_per_adapter_path_in_values_and_gradients():
    base = small_llama()
    am = AdapterModel(base)
    names = [f"j{i}" for i in range(4)]
    for i, n in enumerate(names):
        am.add_adapter(AdapterConfig(name=n, r=4, alpha=8 + i))
        randomize(am, n, seed=i)
        am.set_trainable(n, True)
    ids = torch.randint(0, 97, (8, 6))
    adjacent = [Segment(n, 2 * i, 2 * i + 2) for i, n in enumerate(names)]  # one bmm run
    layer = next(iter(am.layers().values()))
    from rayft.adapters.layer import _batchable_runs

    assert len(_batchable_runs(adjacent, layer.adapters)) == 1
    with am.route(adjacent):
        base(ids).logits.square().mean().backward()
    grads_fused = {n: {k: p.grad.clone() for k, p in am.adapter_parameters(n).items()} for n in names}
    for n in names:
        for p in am.adapter_parameters(n).values():
            p.grad = None
    loss = 0
    for s in adjacent:
        with am.use(s.adapter, rows=2):
            loss = loss + base(ids[s.start : s.stop]).logits.square().sum() / (8 * 6 * 97)
    loss.backward()
    for n in names:
        for k, p in am.adapter_parameters(n).items():
            torch.testing.assert_close(p.grad, grads_fused[n][k], atol=1e-6, rtol=1e-4)


def test_merged_weights_give_same_logits_and_unmerge_restores():
    base = small_llama()
    am = AdapterModel(base)
    for i, c in enumerate(mixed_adapters()):
        am.add_adapter(c)
        randomize(am, c.name, seed=i)
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        plain = base(ids).logits
        for c in mixed_adapters():
            with am.use(c.name, rows=2):
                routed = base(ids).logits
            with am.merged(c.name):
                merged = base(ids).logits
            torch.testing.assert_close(merged, routed, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(base(ids).logits, plain)
        with am.merged("l4"), pytest.raises(RuntimeError, match="merged into this layer"):
            with am.use("l4c", rows=2):
                base(ids)


def test_dropout_masks_come_from_the_adapters_own_generator():
    base = small_llama()
    am = AdapterModel(base)
    am.add_adapter(AdapterConfig(name="d", r=4, dropout=0.5), seed=7)
    am.add_adapter(AdapterConfig(name="e", r=4, dropout=0.5), seed=8)
    randomize(am, "d", 0)
    randomize(am, "e", 1)
    base.train()
    ids = torch.randint(0, 97, (4, 5))
    with torch.no_grad(), am.route([Segment("d", 0, 2), Segment("e", 2, 4)]):
        torch.manual_seed(123)  # the global RNG must not matter
        fused = base(ids).logits
    am.router.generators["d"].set_state({})  # its streams back at their seed
    with torch.no_grad(), am.use("d", rows=2):
        torch.manual_seed(999)
        alone = base(ids[:2]).logits
    torch.testing.assert_close(fused[:2], alone, atol=1e-5, rtol=1e-5)


def test_bad_targets_and_names_are_clear_errors_and_big_ranks_are_not():
    am = AdapterModel(small_llama())
    with pytest.raises(AdapterError, match="match no linear layer.*q_proj"):
        am.add_adapter(AdapterConfig(name="x", target_modules=["qproj"]))
    # a rank above a layer's size is PEFT's full-rank delta, not an error
    am.add_adapter(AdapterConfig(name="y", r=100))
    assert am.adapter_parameters("y")["model.layers.0.self_attn.k_proj.lora_A"].shape == (100, 64)
    am.add_adapter(AdapterConfig(name="train", r=2))  # names that shadow nn.Module attributes work
    with pytest.raises(AdapterError, match="already exists"):
        am.add_adapter(AdapterConfig(name="train", r=2))
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        am.route([Segment("nope", 0, 1)])


def test_corrupt_adapter_file_is_a_clear_error_and_leaves_model_untouched(tmp_path):
    base = small_llama()
    am = AdapterModel(base)
    am.add_adapter(AdapterConfig(name="a", r=4))
    save_adapter(am, "a", tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="cannot read weights"):
        load_adapter(am, tmp_path / "a", "b")
    assert set(am.configs) == {"a"}


@pytest.mark.parametrize("train", [False, True])
def test_adapters_of_unequal_row_counts_share_one_grouped_computation(train, monkeypatch):
    """Inference gathers each row's adapter; training pads the segments to the longest. Either way
    one run serves the three adapters, nothing is stacked per forward, and each segment gets what
    its adapter alone gives it (the gradients too, in training)."""
    base = small_llama()
    am = AdapterModel(base)
    names = ["g0", "g1", "g2"]
    for i, n in enumerate(names):
        am.add_adapter(AdapterConfig(name=n, r=4, alpha=8 + 4 * i))
        randomize(am, n, seed=10 + i)
    base.train(train)
    ids = torch.randint(0, 97, (9, 5))
    segs = [Segment("g0", 0, 2), Segment("g1", 2, 5), Segment("g2", 5, 9)]  # 2, 3 and 4 rows
    layer = next(iter(am.layers().values()))
    from rayft.adapters.layer import _batchable_runs

    assert len(_batchable_runs(segs, layer.adapters)) == 1
    # a segment more than twice another's size starts a run of its own (padding stays under 2x)
    assert len(_batchable_runs(segs + [Segment("g0", 9, 18)], layer.adapters)) == 2
    with monkeypatch.context() as m, am.route(segs):
        m.setattr(torch, "stack", lambda *a, **k: pytest.fail("adapters stacked in a forward"))
        gathered = base(ids).logits
    gathered.square().mean().backward()
    grads = {n: {k: p.grad.clone() for k, p in am.adapter_parameters(n).items()} for n in names}
    for s in segs:
        for p in am.adapter_parameters(s.adapter).values():
            p.grad = None
        with am.use(s.adapter, rows=s.rows):
            alone = base(ids[s.start : s.stop]).logits
        torch.testing.assert_close(gathered[s.start : s.stop], alone, atol=1e-5, rtol=1e-5)
        (alone.square().sum() / gathered.numel()).backward()
        for k, p in am.adapter_parameters(s.adapter).items():
            torch.testing.assert_close(p.grad, grads[s.adapter][k], atol=1e-6, rtol=1e-4)


def test_stacked_storage_adds_removes_and_grows_without_disturbing_adapters():
    """Adapters of one rank share a layer's stack; removing one frees its slot for the next; growing
    the stack keeps every adapter's weights, its parameter objects and its optimiser's hold on them."""
    base = small_llama()
    am = AdapterModel(base)
    for n in ("a", "b", "c", "d"):
        am.add_adapter(AdapterConfig(name=n, r=4))
        randomize(am, n, seed=ord(n))
    layer = next(iter(am.layers().values()))
    stack = layer.stacks[4]
    assert stack.capacity == 4 and len(stack) == 4
    before = {n: {k: p for k, p in am.adapter_parameters(n).items()} for n in "abcd"}
    values = {n: {k: p.detach().clone() for k, p in before[n].items()} for n in "abcd"}
    opt = torch.optim.SGD(before["b"].values(), lr=0.1)
    am.remove_adapter("c")
    am.add_adapter(AdapterConfig(name="e", r=4))  # takes c's slot
    assert len(stack) == 4 and stack.capacity == 4
    am.add_adapter(AdapterConfig(name="f", r=4))  # full: the stack doubles
    assert stack.capacity == 8 and len(stack) == 5
    for n in "abd":
        for k, p in am.adapter_parameters(n).items():
            assert p is before[n][k]  # the same Parameter objects
            torch.testing.assert_close(p.detach(), values[n][k])
    # the optimiser still moves b's weights, which the forward reads from the new stack
    am.set_trainable("b", True)
    with am.use("b", rows=2):
        base(torch.randint(0, 97, (2, 5))).logits.square().mean().backward()
    opt.step()
    A = am.adapter_parameters("b")["model.layers.0.self_attn.q_proj.lora_A"]
    slot = layer.adapters["b"].slot
    assert torch.equal(layer.stacks[4].A[slot].detach(), A.detach())
    assert not torch.equal(A.detach(), values["b"]["model.layers.0.self_attn.q_proj.lora_A"])


def test_a_second_adapter_model_on_one_model_is_refused_not_silently_unrouted(tmp_path):
    """Layers wrapped by one AdapterModel route by its router: a second one on the same model could
    add adapters that no forward ever applies. It is refused by name."""
    import transformers

    from rayft.adapters import AdapterError, AdapterModel
    from rayft.config import AdapterConfig

    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    AdapterModel(model).add_adapter(AdapterConfig(name="a", target_modules=["q_proj"]))
    with pytest.raises(AdapterError, match="a layer of another AdapterModel of this model; use that one"):
        AdapterModel(model).add_adapter(AdapterConfig(name="b", target_modules=["q_proj"]))
