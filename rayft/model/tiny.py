"""The project's own tiny Llama model, for tests and the CPU demo (no downloads).

`build_tiny_model(out_dir)` writes a Hugging Face model directory that loads exactly like a real
TinyLlama checkout: `AutoTokenizer.from_pretrained(dir)` and `AutoModelForCausalLM.from_pretrained(dir)`.

- Model: `LlamaForCausalLM`, 4 layers, hidden 128, 4 query heads sharing 2 key/value heads (GQA),
  head dim 32, SwiGLU MLP 384 wide, RoPE, RMSNorm, tied embeddings drawn at std 0.1 (see
  build_tiny_model); about 0.8M parameters, so several adapters train in a minute on two CPU cores.
- Tokenizer: a fast tokenizer trained with the `tokenizers` library on the shipped corpus
  (`rayft/model/corpus/*.txt`). It is character level (every character is its own pre-token, so
  BPE learns no merges): string tasks such as upper-casing or reversing a word are then expressible
  one token per letter. Special tokens `<unk> <s> </s> <pad>` plus the chat role markers
  `<|system|> <|user|> <|assistant|>`; `<s>` is prepended on encode, like Llama's tokenizer.
- Pre-training (`pretrain_steps > 0`, off by default): a plain AdamW loop over text made from the
  shipped corpus: prose paragraphs and generic "copy structure" lines (repeated lists, words in
  capitals, spelled out). Measured on 2026-11-22: a few hundred steps (one to two CPU minutes) do
  not teach the base to copy from its input (1% exact copies), so LoRA on top still cannot learn
  copy tasks such as upper-casing; it is kept for longer runs, not used by the demo.

Everything is deterministic given `seed`. The directory is built next to `out_dir` under a
temporary name and renamed into place, so an interrupted build leaves nothing half-made.
"""

from __future__ import annotations

import math
import os
import random
import string
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from rayft.atomic import atomic_dir

CORPUS_DIR = Path(__file__).parent / "corpus"

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, *ROLE_TOKENS]
# Printable ASCII plus newline and tab: every character the tokenizer knows, whatever the corpus holds.
ALPHABET = sorted(set(string.printable) - {"\r", "\x0b", "\x0c"})

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<|user|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

MODEL_SHAPE = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)

DEFAULT_PRETRAIN_STEPS = 0
EMBED_STD = 0.1
INIT_STD = 0.1
PRETRAIN_SEQ_LEN = 128
PRETRAIN_BATCH = 16
PRETRAIN_LR = 1e-2
PROSE_FRACTION = 0.15


# ----------------------------------------------------------------------------------------- corpus


def corpus_files() -> list[Path]:
    return sorted(CORPUS_DIR.glob("*.txt"))


def corpus_words() -> list[str]:
    """The shipped word list (deduplicated, in file order)."""
    seen: dict[str, None] = {}
    for w in (CORPUS_DIR / "words.txt").read_text().split():
        seen.setdefault(w, None)
    return list(seen)


def _paragraphs() -> list[str]:
    text = (CORPUS_DIR / "prose.txt").read_text()
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def _synthetic_line(rng: random.Random, words: list[str]) -> str:
    """One line of generic copy-structured text: the features string tasks are built from.

    Real text repeats itself, quotes, spells and shouts; a one-minute pre-training run only learns to
    copy from context (induction) if it sees a lot of that, so these lines are dense with it.
    """
    kind = rng.randrange(7)
    ws = rng.sample(words, rng.randint(2, 4))
    w = ws[0]
    if kind == 0:  # a list, said twice
        lst = " ".join(ws)
        return f"{lst}. {rng.choice(['Again', 'Once more', 'Repeat'])}: {lst}."
    if kind == 1:  # plain and in capitals
        phrase = " ".join(ws[:2])
        return f"{phrase}, or in capitals {phrase.upper()}."
    if kind == 2:  # a sign in capitals and its plain form
        return f"The sign said {w.upper()}, which is {w}."
    if kind == 3:  # spelled out letter by letter
        return f"{w} is spelled {' '.join(w)}."
    if kind == 4:  # backwards
        return f"{w} backwards is {w[::-1]}."
    if kind == 5:  # letters in order
        return f"The letters of {w} in order are {''.join(sorted(w))}."
    start = rng.randrange(20)  # alphabet and counting runs
    run = string.ascii_lowercase[start : start + rng.randint(4, 7)]
    return f"Letters: {' '.join(run)}. Numbers: {' '.join(str(i) for i in range(start, start + 6))}."


def pretrain_text_stream(seed: int) -> Iterator[str]:
    """An endless, seeded stream of pre-training documents (prose paragraphs and copy lines)."""
    rng = random.Random(seed)
    words = corpus_words()
    paragraphs = _paragraphs()
    while True:
        if rng.random() < PROSE_FRACTION:
            yield rng.choice(paragraphs)
        else:
            yield "\n".join(_synthetic_line(rng, words) for _ in range(rng.randint(2, 6)))


# -------------------------------------------------------------------------------------- tokenizer


def train_tokenizer():
    """A character-level fast tokenizer trained on the shipped corpus (`tokenizers.Tokenizer`)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    # Every character is its own pre-token: BPE can learn no merges, the vocabulary is the alphabet.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=len(SPECIAL_TOKENS) + len(ALPHABET),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=ALPHABET,
        limit_alphabet=len(ALPHABET),
        show_progress=False,
    )
    tok.train_from_iterator((p.read_text() for p in corpus_files()), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def _hf_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=ROLE_TOKENS,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
        padding_side="right",
    )


# ------------------------------------------------------------------------------------------ model


def _config(tok):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        **MODEL_SHAPE,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        initializer_range=INIT_STD,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS),
        pad_token_id=tok.token_to_id(PAD),
        torch_dtype="float32",
    )


def _pretrain_batches(tok, seed: int, seq_len: int, batch: int):
    """Endless (batch, seq_len + 1) tensors of packed token ids from the pre-training stream."""
    import torch

    eos = tok.token_to_id(EOS)
    buf: list[int] = []
    stream = pretrain_text_stream(seed)
    need = batch * (seq_len + 1)
    while True:
        while len(buf) < need:
            buf.extend(tok.encode(next(stream)).ids)
            buf.append(eos)
        chunk, buf = buf[:need], buf[need:]
        yield torch.tensor(chunk, dtype=torch.long).view(batch, seq_len + 1)


def pretrain(model, tok, steps: int, *, seed: int, lr: float | None = None, log=print) -> None:
    """Plain PyTorch causal-LM pre-training: AdamW, linear warm-up, cosine decay."""
    import torch

    lr = PRETRAIN_LR if lr is None else lr
    warmup = max(1, min(30, steps // 10))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (s + 1) / warmup if s < warmup else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))),
    )
    batches = _pretrain_batches(tok, seed, PRETRAIN_SEQ_LEN, PRETRAIN_BATCH)
    model.train()
    t0 = time.time()
    for step in range(steps):
        ids = next(batches)
        loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if log and (step % 50 == 0 or step == steps - 1):
            log(f"tiny pretrain step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    model.eval()


# ------------------------------------------------------------------------------------------ build


def build_tiny_model(
    out_dir: str | os.PathLike,
    *,
    pretrain_steps: int = DEFAULT_PRETRAIN_STEPS,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Write the tiny Llama model + tokenizer to `out_dir` (replacing it) and return its path.

    The default, `pretrain_steps=0`, is a random-init model, made in well under a second; with
    steps > 0 it is pre-trained on the shipped corpus first (16 x 128 tokens a step).
    """
    import torch
    from transformers import LlamaForCausalLM

    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tok = train_tokenizer()
    config = _config(tok)
    with torch.random.fork_rng(devices=[]):  # seed the build without touching the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        # Init scale decides whether LoRA can learn on a random base (measured 2026-11-22, demo tasks):
        # - HF's std 0.02 suits wide trained models; at width 128 it leaves MLP and attention
        #   activations ~100x smaller than the residual, so adapters barely move the output, and a
        #   frozen untied head caps logits near ±2.5: LoRA only learned the most common answer.
        # - std 0.1 ≈ 1/sqrt(128) everywhere, with tied embeddings (logits up to about ±13): the
        #   same adapters reach 76-82% exact match on held-out words in 150 steps.
        torch.nn.init.normal_(model.get_input_embeddings().weight, std=EMBED_STD)
        if pretrain_steps > 0:
            pretrain(model, tok, pretrain_steps, seed=seed, log=log)
    model.eval()

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        _hf_tokenizer(tok).save_pretrained(tmp)
    if log:
        n = sum(p.numel() for p in model.parameters())
        log(f"tiny model ({n / 1e6:.2f}M params, {pretrain_steps} pretrain steps) written to {out} in {time.time() - t0:.1f}s")
    return out
