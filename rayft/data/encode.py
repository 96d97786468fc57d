"""One example -> token ids plus a mask of the tokens the loss is taken on (the response only)."""

from __future__ import annotations

from dataclasses import dataclass

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .formats import DataError, detect_format

DEFAULT_TEMPLATE = "{{ instruction }}\n{% if input %}{{ input }}\n{% endif %}### Answer:\n"

# keep_trailing_newline: Jinja drops a template's final newline by default, which would glue the
# prompt to the answer. Sandboxed because templates come from user configs.
_env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


@dataclass
class Encoded:
    input_ids: list[int]
    loss_mask: list[bool]  # loss_mask[t]: token t is a response token the model learns to predict

    def __len__(self) -> int:
        return len(self.input_ids)


def compile_template(template: str | None = None) -> jinja2.Template:
    try:
        return _env.from_string(template or DEFAULT_TEMPLATE)
    except jinja2.TemplateSyntaxError as e:
        raise DataError(f"prompt template: syntax error on line {e.lineno}: {e.message}") from None


def render_prompt(example: dict, template: str | jinja2.Template | None = None) -> str:
    """The alpaca prompt (everything before the output) as the model sees it."""
    tpl = template if isinstance(template, jinja2.Template) else compile_template(template)
    try:
        return tpl.render(**{"input": "", **{k: v for k, v in example.items() if v is not None}})
    except jinja2.UndefinedError as e:
        raise DataError(f"prompt template: {e.message} (row has fields: {', '.join(sorted(example))})") from None
    except Exception as e:  # a user's template can fail in any way (types, the sandbox): name it
        raise DataError(f"prompt template: {type(e).__name__}: {e}") from None


def _tokenize_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> Encoded:
    """Tokenize the whole text once (as at inference) and mark tokens overlapping any char span."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, mask = list(enc["input_ids"]), []
    for a, b in enc["offset_mapping"]:
        mask.append(a < b and any(a < e and b > s for s, e in spans))
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids, mask = [bos] + ids, [False] + mask
    return Encoded(ids, mask)


def encode_alpaca(example: dict, tokenizer, template: str | jinja2.Template | None = None) -> Encoded:
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer has no eos token; the model could not learn where an answer ends")
    prompt = render_prompt(example, template)
    text = prompt + example["output"]
    out = _tokenize_spans(tokenizer, text, [(len(prompt), len(text))])
    return Encoded(out.input_ids + [tokenizer.eos_token_id], out.loss_mask + [True])


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_chat(example: dict, tokenizer) -> Encoded:
    """Assistant spans are found by rendering prefixes of the conversation: turn i's span is what
    rendering messages[:i+1] adds to messages[:i] + generation prompt. Works with any template that
    renders a conversation's prefixes as prefixes of its full text."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("chat rows need a tokenizer with a chat template")
    messages = [{"role": m["role"], "content": m["content"]} for m in example["messages"]]
    full = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True)
        upto = _render(tokenizer, messages[: i + 1], False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise DataError(
                f"chat template renders message {i} differently depending on what follows it; "
                "cannot locate the assistant turn"
            )
        # rstrip: the newline a template puts after the end marker is not something to learn.
        spans.append((len(before), len(before) + len(upto[len(before) :].rstrip())))
    return _tokenize_spans(tokenizer, full, spans)


def encode_example(example: dict, tokenizer, template: str | jinja2.Template | None = None) -> Encoded:
    kind = detect_format(example)
    if kind == "chat":
        return encode_chat(example, tokenizer)
    if kind == "alpaca":
        return encode_alpaca(example, tokenizer, template)
    raise DataError(f"cannot tell the format of example with fields {sorted(example)}")


def encode_examples(examples: list[dict], tokenizer, template: str | None = None, source: str = "") -> list[Encoded]:
    """Encode a whole dataset; errors name the source and the example's index."""
    where = f"{source}: " if source else ""
    try:
        tpl = compile_template(template)
    except DataError as e:
        raise DataError(f"{where}{e}") from None
    out = []
    for i, ex in enumerate(examples):
        try:
            out.append(encode_example(ex, tokenizer, tpl))
        except DataError as e:
            raise DataError(f"{where}example {i}: {e}") from None
    return out


def answer_text(example: dict) -> str:
    """The expected response: alpaca's output, or a chat's last assistant turn."""
    if detect_format(example) == "chat":
        return [m for m in example["messages"] if m["role"] == "assistant"][-1]["content"]
    return example["output"]


def prompt_and_answer(example: dict, tokenizer, template: str | jinja2.Template | None = None) -> tuple[list[int], str]:
    """For evaluation: the prompt's token ids, exactly as in training, and the expected answer text."""
    if detect_format(example) == "chat":
        messages = [{"role": m["role"], "content": m["content"]} for m in example["messages"]]
        while messages[-1]["role"] != "assistant":  # the answer is the last assistant turn
            messages.pop()
        text = _render(tokenizer, messages[:-1], True)
    else:
        text = render_prompt(example, template)
    return _tokenize_spans(tokenizer, text, []).input_ids, answer_text(example)
