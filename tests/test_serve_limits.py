"""The server's request limits without Ray: the body limit (413, OpenAI's shape, read no further
than needed) on the real ASGI app, and the cheap length bound used before tokenising."""

import asyncio
import json
import random

import pytest

from rayft.serving import server


def _post(chunks: list[bytes], declared: int | None):
    """POST /v1/completions to rayft's FastAPI app over raw ASGI: (status, body, messages left unread)."""
    headers = [(b"content-type", b"application/json")]
    if declared is not None:
        headers.append((b"content-length", str(declared).encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    try:
        asyncio.run(server.app(scope, receive, send))
    except Exception:  # a body under the limit reaches the route, which needs a Serve replica: answered 500
        assert sent, "an error without an answer"
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]), len(messages)


@pytest.fixture
def limit():
    old = getattr(server.app.state, "max_body_bytes", None)
    yield lambda n: setattr(server.app.state, "max_body_bytes", n)
    server.app.state.max_body_bytes = old if old is not None else server.ServeConfig.model_fields["max_body_bytes"].default


def test_a_body_over_the_limit_is_a_413_in_openai_s_shape_with_or_without_content_length(limit):
    rng = random.Random(0)
    for _ in range(60):
        cap = rng.randint(1024, 8192)
        limit(cap)
        size = rng.choice([cap - rng.randint(0, 50), cap, cap + 1, cap + rng.randint(2, 5 * cap)])
        body = json.dumps({"model": "a", "prompt": "x" * max(0, size - 29)}).encode()[:size].ljust(size, b" ")
        cuts = sorted(rng.sample(range(1, size), rng.randint(0, 6)))
        chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, size])]
        declared = size if rng.random() < 0.5 else None
        status, out, unread = _post(chunks, declared)
        if size > cap:
            assert status == 413, (size, cap, declared, out[:200])
            err = json.loads(out)["error"]
            assert err["code"] == "request_too_large" and str(cap) in err["message"] and err["type"] == "invalid_request_error"
            assert unread == 0, "the rest of a refused body is read and dropped, so the client sees the answer"
        else:
            assert status != 413, (size, cap, declared)


def _byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog " * 20, "    indented    code = 1\n" * 30,
            "café naïve 中文 字符 😀😀 " * 20, "================ ---------------- " * 10]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|im_start|>", "<|im_end|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_no_text_has_fewer_tokens_than_the_cheap_bound_says(tiny_model_dir):
    """The check before tokenising refuses a text of more than positions × max_chars_per_token
    characters: sound only if no token ever stands for more characters than that."""
    from transformers import AutoTokenizer

    rng = random.Random(1)
    pieces = ["the", " quick", "    ", "================", "\n", "é", "中文", "😀", "<|im_start|>", "<s>", "<|user|>",
              "x", " ", "\t", "----------------", "café", "lazy dog "]
    for tok in (AutoTokenizer.from_pretrained(tiny_model_dir), _byte_level_tokenizer()):
        bound = server.max_chars_per_token(tok)
        assert bound >= 1
        for _ in range(200):
            text = "".join(rng.choice(pieces) * rng.randint(1, 6) for _ in range(rng.randint(1, 30)))
            ids = tok.encode(text, add_special_tokens=False)
            assert len(ids) * bound >= len(text), (text, len(ids), bound)
