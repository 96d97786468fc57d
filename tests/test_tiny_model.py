"""The project's tiny model: builds fast, loads through the Auto* classes like a real checkout."""

from __future__ import annotations

import time

import pytest
import torch

from rayft.model.tiny import build_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    import transformers.models.llama.modeling_llama  # noqa: F401  (import time is not build time)

    out = tmp_path_factory.mktemp("tiny") / "model"
    t0 = time.time()
    path = build_tiny_model(out, pretrain_steps=0, log=None)
    assert time.time() - t0 < 5.0
    return path


def test_loads_with_auto_classes(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert cfg.vocab_size == len(tok)
    for name in ("bos", "eos", "pad", "unk"):
        assert getattr(tok, f"{name}_token") is not None
        assert getattr(tok, f"{name}_token_id") == getattr(cfg, f"{name}_token_id", getattr(tok, f"{name}_token_id"))
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4


def test_tokenizer_is_character_level_and_round_trips(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    text = "Reverse the word.\ngarden\n### Answer:\nnedrag"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert len(ids) == len(text) + 1  # one token per character
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok("héllo", add_special_tokens=False).input_ids) == "h<unk>llo"


def test_chat_template(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "HI"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<s><|user|>\nhi\n<|assistant|>\nHI</s>\n"
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")
    ids = tok.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert tok.convert_tokens_to_ids("<|user|>") in ids  # role markers are single tokens


def test_generate_runs(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    ids = tok(["abc", "hello world"], return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (2, ids["input_ids"].shape[1] + 5)


def test_deterministic_and_replaces_atomically(tmp_path):
    from safetensors.torch import load_file

    a = build_tiny_model(tmp_path / "a", pretrain_steps=2, seed=3, log=None)
    b = build_tiny_model(tmp_path / "b", pretrain_steps=2, seed=3, log=None)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # Rebuilding over an existing directory replaces it and leaves no temporary siblings.
    c = build_tiny_model(tmp_path / "a", pretrain_steps=0, seed=4, log=None)
    emb = "model.embed_tokens.weight"  # tied: the head is the embedding
    assert c == a and not torch.equal(load_file(c / "model.safetensors")[emb], wa[emb])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_init_model_command_writes_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayft.cli import main

    assert main(["init-model", "tiny", str(tmp_path / "m"), "--pretrain-steps", "0"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tok)
