"""Preference rows (TRL's formats): a prompt with a chosen and a rejected answer.

Explicit prompt, as plain text or chat messages:
    {"prompt": "...", "chosen": "...", "rejected": "..."}
    {"prompt": [messages], "chosen": [assistant messages], "rejected": [assistant messages]}
Implicit prompt (chat only): {"chosen": [whole conversation], "rejected": [whole conversation]}; the
prompt is the messages both conversations begin with.

A pair is two sequences, prompt + chosen and prompt + rejected, with the very same prompt tokens
(the prompt and each answer are tokenized apart, then joined, so no merge across the boundary can
make the two prompts differ); the loss is taken on the answers' tokens only. Plain-text answers end
with the tokenizer's eos, chat answers with the template's end of turn.
"""

from __future__ import annotations

from dataclasses import dataclass

from .encode import Encoded, _render, _tokenize_spans
from .formats import ROLES, DataError


@dataclass
class EncodedPair:
    chosen: Encoded
    rejected: Encoded

    @property
    def sequences(self) -> tuple[Encoded, Encoded]:
        return self.chosen, self.rejected

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


def _check_messages(value, field: str) -> str | None:
    if not isinstance(value, list) or not value:
        return f"field {field!r} must be a non-empty list of messages"
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            return f"{field}[{i}] must be an object, got {type(m).__name__}"
        for key in ("role", "content"):
            if key not in m:
                return f"{field}[{i}]: missing field {key!r}"
        if m["role"] not in ROLES:
            return f"{field}[{i}]: role must be one of {', '.join(ROLES)}, got {m['role']!r}"
        if not isinstance(m["content"], str):
            return f"{field}[{i}]: field 'content' must be a string, got {type(m['content']).__name__}"
    return None


def check_preference(row: dict) -> str | None:
    """What is wrong with a preference row, or None."""
    for key in ("chosen", "rejected"):
        if key not in row:
            return f"missing field {key!r}"
    chat = isinstance(row["chosen"], list)
    if "prompt" not in row:
        if not chat:
            return "missing field 'prompt' (only chat rows may leave it implicit)"
    elif chat != isinstance(row["prompt"], list):
        return "field 'prompt' must be messages when the answers are, text when they are text"
    for key in ("prompt", "chosen", "rejected"):
        if key not in row:
            continue
        if chat:
            problem = _check_messages(row[key], key)
            if problem:
                return problem
        elif not isinstance(row[key], str):
            return f"field {key!r} must be a string, got {type(row[key]).__name__}"
    if chat and isinstance(row["rejected"], str):
        return "fields 'chosen' and 'rejected' must both be messages or both be text"
    if chat:
        prompt, answers = split_prompt(row)
        if not prompt:
            return "chosen and rejected share no prompt messages"
        for name, answer in zip(("chosen", "rejected"), answers):
            if not answer:
                return f"{name} has no messages after the prompt (nothing to prefer)"
            if answer[0]["role"] != "assistant":
                return f"{name}: the answer must start with an assistant message, got {answer[0]['role']!r}"
    return None


def _messages(msgs: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def split_prompt(row: dict) -> tuple[list[dict], tuple[list[dict], list[dict]]]:
    """A chat row's prompt messages and its two answers' messages (implicit prompts: the shared start)."""
    chosen, rejected = _messages(row["chosen"]), _messages(row["rejected"])
    if "prompt" in row:
        return _messages(row["prompt"]), (chosen, rejected)
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], (chosen[n:], rejected[n:])


def _answer(prompt: Encoded, answer_ids: list[int]) -> Encoded:
    return Encoded(prompt.input_ids + answer_ids, [False] * len(prompt) + [True] * len(answer_ids))


def encode_pair(row: dict, tokenizer) -> EncodedPair:
    if isinstance(row["chosen"], list):
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError("chat preference rows need a tokenizer with a chat template")
        prompt_msgs, answers = split_prompt(row)
        prompt_text = _render(tokenizer, prompt_msgs, True)
        texts = []
        for answer in answers:
            full = _render(tokenizer, prompt_msgs + answer, False)
            if not full.startswith(prompt_text):
                raise DataError("chat template renders the prompt differently once an answer follows it; "
                                "cannot locate the answer")
            texts.append(full[len(prompt_text):].rstrip())
        eos = []
    else:
        prompt_text, texts = row["prompt"], [row["chosen"], row["rejected"]]
        if tokenizer.eos_token_id is None:
            raise DataError("tokenizer has no eos token; the model could not learn where an answer ends")
        eos = [tokenizer.eos_token_id]
    prompt = _tokenize_spans(tokenizer, prompt_text, [])
    chosen, rejected = (_answer(prompt, tokenizer(t, add_special_tokens=False)["input_ids"] + eos) for t in texts)
    return EncodedPair(chosen, rejected)
