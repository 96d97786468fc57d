"""Preference rows (TRL's formats): a prompt with a chosen and a rejected answer.

Rows as `rayft.data.formats` reads them: explicit prompt as text or messages, or (chat) implicit.

A pair is two sequences, prompt + chosen and prompt + rejected, with the very same prompt tokens
(the prompt and each answer are tokenized apart, then joined, so no merge across the boundary can
make the two prompts differ); the loss is taken on the answers' tokens only. Plain-text answers end
with the tokenizer's eos, chat answers with the template's end of turn.
"""

from __future__ import annotations

from dataclasses import dataclass

from .encode import Encoded, _render, _tokenize_spans
from .formats import DataError, split_prompt


@dataclass
class EncodedPair:
    chosen: Encoded
    rejected: Encoded

    @property
    def sequences(self) -> tuple[Encoded, Encoded]:
        return self.chosen, self.rejected

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


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


def encode_pairs(rows: list[dict], tokenizer, source: str = "") -> list[EncodedPair]:
    """Encode a preference dataset; errors name the source and the example's index."""
    where = f"{source}: " if source else ""
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(encode_pair(row, tokenizer))
        except DataError as e:
            raise DataError(f"{where}example {i}: {e}") from None
    return out
