"""The real base (SmolLM2-135M-Instruct from its GGUF) served over HTTP through the openai client:
chats built with its ChatML template, emoji, accented and CJK text whose characters span several
byte-level BPE tokens, streamed deltas that add up to the non-streamed text, and stop strings drawn
from the output itself, streamed and not. One adapter beside the base, so batches are mixed."""

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import torch
from conftest import free_port
from ray import serve
from test_stop_strings import random_stops, reference_cut

from rayft.adapters import AdapterModel, save_adapter
from rayft.config import AdapterConfig, BaseModelConfig, ServeConfig
from rayft.model.load import load_base_model
from rayft.serving.server import build
from rayft.serving.textstream import REPLACEMENT
from rayft.train.evaluate import greedy_generate

MAX_TOKENS = 20
ADAPTER = "emo"
# Each asks for text outside ASCII; SmolLM2 answers most with the characters themselves.
PROMPTS = [
    "Repeat exactly: 🎉🚀 café naïve 你好世界",
    "Repeat: Ça va? Très bien, merci! 😊",
    "Repeat: 🐍🐍 ümlaut ß Ørsted",
    "Say hello in Japanese.",
    "Translate 'good morning' into Chinese.",
    "Write the word 'water' in Chinese characters.",
    "Repeat exactly: 東京 ✨ señor 🌊🌊",
    "Répète: «Élève, où est la forêt?»",
    "Repeat: 日本語 😀 Ärger €100",
    "Repeat exactly: 👍🏽 Zürich 北京",
]


def chat_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt as a one-message chat in the model's template, ready for the answer."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2[2])


@pytest.fixture(scope="module")
def served(smollm2, tokenizer, tmp_path_factory):
    """(openai client, base model id, reference): one Serve app over a store with one LoRA adapter
    on SmolLM2; reference maps (model, prompt) to the greedy answer Hugging Face's generate and a
    decode of all its tokens give in this process, independently of the server's text stream."""
    import openai

    model_dir = smollm2[2]
    base = BaseModelConfig(path=str(model_dir), device="cpu", dtype="float32")
    store = tmp_path_factory.mktemp("real-store")
    model, _ = load_base_model(base)
    am = AdapterModel(model)
    am.add_adapter(AdapterConfig(name=ADAPTER, r=4, alpha=8, target_modules=["q_proj", "v_proj"]), seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B starts at zero: random weights make the adapter change what it says
        for p in am.adapter_parameters(ADAPTER).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    save_adapter(am, ADAPTER, store / "adapters" / ADAPTER, base_model=str(model_dir))
    prompts = [chat_ids(tokenizer, p) for p in PROMPTS]
    reference = {}
    for name, adapter in ((model_dir.name, None), (ADAPTER, ADAPTER)):
        reference.update(zip([(name, p) for p in PROMPTS], greedy_generate(am, tokenizer, prompts, adapter, MAX_TOKENS)))
    del am, model

    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(ServeConfig(store=store, base_model=base, max_tokens_limit=64)), name="rayft", route_prefix="/")
    try:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300), \
            model_dir.name, reference
    finally:
        serve.shutdown()
        ray.shutdown()


def chat(client, model: str, prompt: str, stream: bool, stop: list[str] | None = None):
    """(text, finish_reason, deltas, usage): deltas for a streamed request, usage for one not streamed."""
    kw = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
          "temperature": 0, "stop": stop or None}
    if not stream:
        done = client.chat.completions.create(**kw)
        return done.choices[0].message.content, done.choices[0].finish_reason, None, done.usage
    deltas, finish = [], None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if chunk.choices:
            deltas.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    return "".join(deltas), finish, deltas, None


def all_at_once(fn, cases: list) -> list:
    """Every case in flight together, so the server batches them (base and adapter mixed)."""
    with ThreadPoolExecutor(len(cases)) as pool:
        return list(pool.map(lambda c: fn(*c), cases))


def split_characters(tokenizer, text: str) -> set[str]:
    """The characters of `text` whose UTF-8 bytes fall in more than one of its tokens: a decode
    that stops inside one ends in U+FFFD."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    split = set()
    for k in range(1, len(ids)):
        head = tokenizer.decode(ids[:k])
        if head.endswith(REPLACEMENT):
            split.add(text[len(head.rstrip(REPLACEMENT))])
    return split


@pytest.fixture(scope="module")
def answers(served):
    """(model, prompt) -> (text, finish_reason, usage) of the non-streamed greedy chat."""
    client, base_id, _ = served
    cases = [(m, p) for p in PROMPTS for m in (base_id, ADAPTER)]
    done = all_at_once(lambda m, p: chat(client, m, p, stream=False), cases)
    return {case: (text, finish, usage) for case, (text, finish, _, usage) in zip(cases, done)}


def test_chats_use_the_chatml_template_and_answers_hold_characters_split_across_tokens(served, answers, tokenizer):
    _, base_id, reference = served
    assert "<|im_start|>" in tokenizer.chat_template
    for (model, prompt), (text, finish, usage) in answers.items():
        assert text == reference[(model, prompt)], (model, prompt)
        assert usage.prompt_tokens == len(chat_ids(tokenizer, prompt)), prompt
        assert 0 < usage.completion_tokens <= MAX_TOKENS and finish in ("stop", "length")
        assert "<|im_end|>" not in text and "<|im_start|>" not in text
    split = {case: split_characters(tokenizer, text) for case, (text, _, _) in answers.items()}
    assert sum(bool(s) for s in split.values()) >= len(answers) // 2, split
    kinds = set().union(*split.values())
    assert any(ord(c) > 0x1F000 for c in kinds), f"no emoji split across tokens: {kinds}"
    assert any(0x4E00 <= ord(c) <= 0x9FFF for c in kinds), f"no CJK character split across tokens: {kinds}"
    assert any(0xC0 <= ord(c) <= 0x17F for c in kinds), f"no accented letter split across tokens: {kinds}"
    for p in PROMPTS[:3]:  # the prompts that ask to repeat: greedy does
        assert answers[(base_id, p)][0].strip(), p
    differs = [p for p in PROMPTS if answers[(base_id, p)][0] != answers[(ADAPTER, p)][0]]
    assert differs, "the adapter changes no answer"


def test_streamed_deltas_add_up_to_the_non_streamed_text(served, answers):
    client, _, reference = served
    cases = list(answers)
    streamed = all_at_once(lambda m, p: chat(client, m, p, stream=True), cases)
    for case, (text, finish, deltas, _) in zip(cases, streamed):
        full, full_finish, _ = answers[case]
        assert text == full, case
        assert finish == full_finish, case
        assert text == reference[case], case
        for d in deltas:  # a character split across tokens is sent whole, never as U+FFFD
            assert REPLACEMENT not in d or REPLACEMENT in reference[case], (case, deltas)


def stops_from(rng: random.Random, text: str) -> list[str]:
    """Stop strings drawn from the text (random_stops: any position, spanning tokens, overlapping)
    plus, where the text has any, one that starts or ends inside a run of non-ASCII characters."""
    stops = random_stops(rng, text)
    wide = [i for i, c in enumerate(text) if ord(c) > 0x7F]
    if wide:
        i = rng.choice(wide)
        start = max(0, i - rng.randint(0, 2))
        stops.append(text[start:i + rng.randint(1, 3)])
    return stops


def test_stop_strings_from_the_output_cut_it_at_the_first_stop_streamed_and_not(served, answers, tokenizer):
    client, _, reference = served
    rng = random.Random(7)
    cases = []
    for (model, prompt), text in reference.items():
        for _ in range(2):
            cases.append((model, prompt, stops_from(rng, text)))
    assert len(cases) >= 40
    inside_split = 0
    results = all_at_once(lambda m, p, s: (chat(client, m, p, False, s), chat(client, m, p, True, s)), cases)
    for (model, prompt, stops), (plain, streamed) in zip(cases, results):
        full = reference[(model, prompt)]
        cut = reference_cut(full, stops)
        want, want_finish = (full, answers[(model, prompt)][1]) if cut is None else (full[:cut], "stop")
        for text, finish, deltas, _ in (plain, streamed):
            assert (text, finish) == (want, want_finish), (model, prompt, stops, deltas)
        for d in streamed[2]:
            assert REPLACEMENT not in d or REPLACEMENT in full, (model, prompt, stops, streamed[2])
        split = split_characters(tokenizer, full)
        inside_split += any(c in split for s in stops if full.find(s) >= 0 for c in s)
    assert inside_split >= len(cases) // 4, "too few stop strings over characters split across tokens"
