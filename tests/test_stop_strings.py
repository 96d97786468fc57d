"""Stop strings and incremental detokenisation: the streamed deltas add up to the non-streamed text,
which is the unstopped text cut at the first stop string; nothing of a stop string is ever sent.

Generated cases over two tokenizers: the tiny model's (one character a token) and a byte-level BPE
trained here (tokens of several characters, and characters split across tokens), so that stop
strings start mid-token, span tokens, overlap each other, and multi-byte characters arrive in pieces.
"""

import random

import pytest
import torch
from test_serving_engine import engine_for, store  # noqa: F401  (the store fixture: adapters a, b, c)

from rayft.serving.engine import GenRequest, Sampling
from rayft.serving.textstream import REPLACEMENT, TextStream

WORDS = ["héllo", "wörld", "naïve", "日本語", "中文字", "emoji😀", "🙂ok", "ab", "abab", "A>", "dAA", "ça", "ñ", "x"]


@pytest.fixture(scope="module")
def byte_bpe():
    """A GPT-2-style byte-level BPE, small enough that some characters span two tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(200)]
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


@pytest.fixture(scope="module")
def char_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def reference_cut(text: str, stops: list[str]) -> int | None:
    """Character by character: the first position where some stop string ends; the text is cut at
    the start of the longest stop string ending there (the earliest start)."""
    stops = [s for s in stops if s]
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            return end - max(len(s) for s in ending)
    return None


def held_length(text: str, stops: list[str]) -> int:
    """The longest suffix of `text` that is a proper prefix of a stop string (must wait)."""
    return max((n for s in stops if s for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


def random_stops(rng: random.Random, text: str) -> list[str]:
    """Stop strings from the text itself: at random character positions (mid-token for
    multi-character tokens), spanning tokens, overlapping each other, ending at the very end; and
    some that do not occur."""
    stops = []
    for _ in range(rng.randint(1, 3)):
        if not text:
            break
        start = rng.randrange(len(text))
        kind = rng.random()
        if kind < 0.15:  # ends exactly at the end of the text
            stops.append(text[start:])
        else:
            stops.append(text[start:start + rng.randint(1, 5)])
        if kind > 0.7 and start + 1 < len(text):  # an overlapping one, shifted by a character or two
            shift = rng.randint(1, 2)
            stops.append(text[start + shift:start + shift + rng.randint(1, 4)])
    if rng.random() < 0.3:
        stops.append(rng.choice(WORDS) + "#")  # never occurs
    if rng.random() < 0.2 and stops:
        stops.append(stops[0] + stops[0][:1])  # a stop that extends another
    return [s for s in stops if s]


def run(stream: TextStream, ids: list[int]) -> tuple[list[str], int | None]:
    """Push tokens until a stop string ends the text; (deltas, index of the stopping token)."""
    deltas = []
    for k, tok in enumerate(ids):
        delta, stopped = stream.push(tok)
        deltas.append(delta)
        if stopped:
            return deltas, k
    delta, stopped = stream.close()
    deltas.append(delta)
    return deltas, (len(ids) - 1 if stopped else None)


def check_case(decode, ids: list[int], stops: list[str]) -> None:
    full = decode(ids)
    cut = reference_cut(full, stops)
    want = full if cut is None else full[:cut]
    deltas, stopped_at = run(TextStream(decode, stops), ids)
    assert "".join(deltas) == want, (full, stops, deltas)
    # the token that stops is the first whose complete text holds a stop string
    visible = [decode(ids[:k + 1]).rstrip(REPLACEMENT) for k in range(len(ids))]
    first = next((k for k, v in enumerate(visible) if reference_cut(v, stops) is not None), None)
    assert stopped_at == first, (full, stops, stopped_at, first)
    # eager: after each token, all is sent except an incomplete character and a possible stop start
    sent = ""
    for k, delta in enumerate(deltas[: len(visible) if stopped_at is None else stopped_at]):
        sent += delta
        v = visible[k]
        assert sent == v[: len(v) - held_length(v, stops)], (full, stops, k, sent)


def texts(rng: random.Random, n: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))) for _ in range(n)]


def test_stops_over_a_byte_level_bpe_with_multibyte_characters(byte_bpe):
    decode = lambda ids: byte_bpe.decode(ids, skip_special_tokens=True)  # noqa: E731
    split = [t for t in range(byte_bpe.get_vocab_size()) if REPLACEMENT in decode([t])]
    assert split, "the tokenizer has tokens holding part of a character: the case under test"
    rng = random.Random(1)
    spans_tokens = mid_token = 0
    for text in texts(rng, 400):
        ids = byte_bpe.encode(text).ids
        assert decode(ids) == text
        stops = random_stops(rng, text)
        check_case(decode, ids, stops)
        starts = {len(decode(ids[:k])) for k in range(len(ids))}
        for s in stops:
            at = text.find(s)
            mid_token += at >= 0 and at not in starts
            spans_tokens += at >= 0 and any(at < b < at + len(s) for b in starts)
    assert mid_token > 50 and spans_tokens > 50, (mid_token, spans_tokens)


def test_stops_over_the_tiny_character_tokenizer(char_tokenizer):
    decode = lambda ids: char_tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    rng = random.Random(2)
    alphabet = "dA>ab c"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 20)))
        ids = char_tokenizer.encode(text, add_special_tokens=False)
        check_case(decode, ids, random_stops(rng, text))
    check_case(decode, char_tokenizer.encode("dAAA>", add_special_tokens=False), ["A>"])  # the case


def test_any_token_sequence_decodes_incrementally_to_the_full_decode(byte_bpe):
    """Random token ids (invalid UTF-8 included): the deltas add up to decoding all ids at once."""
    decode = lambda ids: byte_bpe.decode(ids, skip_special_tokens=True)  # noqa: E731
    rng = random.Random(3)
    vocab = byte_bpe.get_vocab_size()
    for _ in range(300):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 30))]
        deltas, stopped = run(TextStream(decode, []), ids)
        assert stopped is None and "".join(deltas) == decode(ids)


def test_engine_stop_strings_streamed_and_not_equal_the_unstopped_text_cut(tiny_model_dir, store):  # noqa: F811
    """Greedy generations with stop strings drawn from their own unstopped text: the joined deltas
    are the returned text, the unstopped text cut at the first stop; the finish comes once, last;
    a stop completed by the last allowed token still finishes 'stop' and sends nothing of it."""
    eng = engine_for(tiny_model_dir)
    tok = eng.tokenizer
    rng = random.Random(4)
    paths = {n: store / "adapters" / n for n in ("a", "b")}
    prompts = ["".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 12))) for _ in range(48)]
    plain = [GenRequest(tok.encode(p), rng.choice([None, "a", "b"]), Sampling(max_tokens=rng.randint(4, 24),
                                                                              temperature=0)) for p in prompts]
    unstopped = eng.generate(plain, paths=paths)
    stopped, wants = [], []
    for req, out in zip(plain, unstopped):
        stops = random_stops(rng, out.text)
        max_tokens = req.sampling.max_tokens
        if stops and rng.random() < 0.3:  # the stop completes exactly at the last allowed token
            end = out.text.find(stops[0]) + len(stops[0])
            lengths = [len(tok.decode(out.token_ids[:k + 1], skip_special_tokens=True)) for k in range(len(out.token_ids))]
            max_tokens = next(k + 1 for k, n in enumerate(lengths) if n >= end)
            stops = stops[:1]
        cut = reference_cut(out.text, stops)
        wants.append((out.text if cut is None else out.text[:cut], cut))
        stopped.append(GenRequest(req.prompt_ids, req.adapter, Sampling(max_tokens=max_tokens, temperature=0, stop=stops)))
    events: dict = {}
    outs = eng.generate(stopped, on_delta=lambda i, t, f, n: events.setdefault(i, []).append((t, f)), paths=paths)
    for i, (out, (want, cut)) in enumerate(zip(outs, wants)):
        assert out.text == want, (i, unstopped[i].text, stopped[i].sampling.stop)
        assert "".join(t for t, _ in events[i]) == want
        finishes = [f for _, f in events[i] if f is not None]
        assert finishes == [out.finish_reason] and events[i][-1] == ("", out.finish_reason), events[i]
        if cut is not None:
            assert out.finish_reason == "stop"
        else:
            assert out.finish_reason == unstopped[i].finish_reason
    assert sum(c is not None for _, c in wants) > 20


def test_unseeded_sampling_leaves_the_global_generator_alone(tiny_model_dir):
    eng = engine_for(tiny_model_dir)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    eng.generate([GenRequest([1, 2, 3], None, Sampling(max_tokens=4, temperature=1.0)) for _ in range(3)])
    assert torch.equal(torch.random.get_rng_state(), before)
