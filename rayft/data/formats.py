"""Read a dataset file (JSON list or JSONL) of alpaca, chat or preference rows, checking every row.

Preference rows are TRL's: `prompt` / `chosen` / `rejected`, as plain text or chat messages; a chat
row may leave its prompt implicit (the messages both answers' conversations begin with)."""

from __future__ import annotations

import json
from pathlib import Path

FORMATS = ("alpaca", "chat", "preference")
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file, the row and the problem."""


def detect_format(row) -> str | None:
    if not isinstance(row, dict):
        return None
    if "chosen" in row or "rejected" in row:
        return "preference"
    if "messages" in row:
        return "chat"
    if "instruction" in row or "output" in row:
        return "alpaca"
    return None


def _check_alpaca(row: dict) -> str | None:
    for key in ("instruction", "output"):
        if key not in row:
            return f"missing field {key!r}"
        if not isinstance(row[key], str):
            return f"field {key!r} must be a string, got {type(row[key]).__name__}"
    if row.get("input") is not None and not isinstance(row["input"], str):
        return f"field 'input' must be a string, got {type(row['input']).__name__}"
    return None


def _check_messages(msgs, field: str) -> str | None:
    if not isinstance(msgs, list) or not msgs:
        return f"field {field!r} must be a non-empty list of messages"
    for i, m in enumerate(msgs):
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


def _check_chat(row: dict) -> str | None:
    problem = _check_messages(row.get("messages"), "messages")
    if problem:
        return problem
    if not any(m["role"] == "assistant" for m in row["messages"]):
        return "no assistant message (nothing to learn)"
    return None


def _messages(msgs: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def split_prompt(row: dict) -> tuple[list[dict], tuple[list[dict], list[dict]]]:
    """A chat preference row's prompt messages and its two answers' (an implicit prompt: the
    messages both conversations begin with, all but the last of the shorter at most)."""
    chosen, rejected = _messages(row["chosen"]), _messages(row["rejected"])
    if "prompt" in row:
        return _messages(row["prompt"]), (chosen, rejected)
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], (chosen[n:], rejected[n:])


def _check_preference(row: dict) -> str | None:
    for key in ("chosen", "rejected"):
        if key not in row:
            return f"missing field {key!r}"
    chat = isinstance(row["chosen"], list)
    if chat != isinstance(row["rejected"], list):
        return "fields 'chosen' and 'rejected' must both be messages or both be text"
    if "prompt" not in row:
        if not chat:
            return "missing field 'prompt' (only chat rows may leave it implicit)"
    elif chat != isinstance(row["prompt"], list):
        return f"field 'prompt' must be {'messages' if chat else 'text'}, as the answers are"
    for key in ("prompt", "chosen", "rejected"):
        if key in row:
            problem = _check_messages(row[key], key) if chat else (
                None if isinstance(row[key], str) else f"field {key!r} must be a string, got {type(row[key]).__name__}")
            if problem:
                return problem
    if chat:
        prompt, answers = split_prompt(row)
        if not prompt:
            return "no prompt: the chosen and rejected conversations share no first messages"
        for name, answer in zip(("chosen", "rejected"), answers):
            if not answer:
                return f"{name}: no messages after the prompt (nothing to prefer)"
            if answer[0]["role"] != "assistant":
                return f"{name}: the answer must start with an assistant message, got {answer[0]['role']!r}"
    return None


_CHECKS = {"alpaca": _check_alpaca, "chat": _check_chat, "preference": _check_preference}


def _read_rows(path: Path) -> list[tuple[str, object]]:
    """(where, row) pairs; `where` is 'line N' for JSONL and 'item N' for a JSON list."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        return [(f"item {i}", row) for i, row in enumerate(items)]
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {n}: malformed JSON: {e.msg} (column {e.colno})") from None
    return rows


def load_examples(path: str | Path, fmt: str = "auto") -> list[dict]:
    """Rows of a JSON list or JSONL file, all of one format (alpaca, chat or preference), each validated."""
    path = Path(path)
    if fmt not in ("auto", *FORMATS):
        raise DataError(f"{path}: unknown format {fmt!r} (use auto, {', '.join(FORMATS)})")
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"{path}: dataset is empty")
    first_where, first = rows[0]
    if fmt == "auto":
        fmt = detect_format(first)
        if fmt is None:
            raise DataError(
                f"{path}: {first_where}: cannot detect the format: expected an object with "
                "'messages' (chat), 'instruction'/'output' (alpaca) or 'chosen'/'rejected' (preference)"
            )
    out = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{path}: {where}: expected an object, got {type(row).__name__}")
        kind = detect_format(row)
        if kind is not None and kind != fmt:
            raise DataError(f"{path}: {where}: mixed formats: this row is {kind}, the dataset is {fmt}")
        problem = _CHECKS[fmt](row)
        if problem:
            raise DataError(f"{path}: {where}: {problem}")
        out.append(row)
    return out


def write_task_files(out_dir: Path, tasks, rows) -> None:
    """The example configs' data generators: `rows(task)` written as out_dir/<task>.jsonl for each task."""
    for task in tasks:
        path = Path(out_dir) / f"{task}.jsonl"
        data = rows(task)
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
        print(f"{path}: {len(data)} rows")
