"""Read a dataset file (JSON list or JSONL) of alpaca or chat rows, checking every row."""

from __future__ import annotations

import json
from pathlib import Path

FORMATS = ("alpaca", "chat")
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file, the row and the problem."""


def detect_format(row) -> str | None:
    if not isinstance(row, dict):
        return None
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


def _check_chat(row: dict) -> str | None:
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "field 'messages' must be a non-empty list"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            return f"messages[{i}] must be an object, got {type(m).__name__}"
        for key in ("role", "content"):
            if key not in m:
                return f"messages[{i}]: missing field {key!r}"
        if m["role"] not in ROLES:
            return f"messages[{i}]: role must be one of {', '.join(ROLES)}, got {m['role']!r}"
        if not isinstance(m["content"], str):
            return f"messages[{i}]: field 'content' must be a string, got {type(m['content']).__name__}"
    if not any(m["role"] == "assistant" for m in msgs):
        return "no assistant message (nothing to learn)"
    return None


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
    """Rows of a JSON list or JSONL file, all of one format (alpaca or chat), each validated."""
    path = Path(path)
    if fmt not in ("auto", *FORMATS):
        raise DataError(f"{path}: unknown format {fmt!r} (use auto, alpaca or chat)")
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"{path}: dataset is empty")
    first_where, first = rows[0]
    if fmt == "auto":
        fmt = detect_format(first)
        if fmt is None:
            raise DataError(
                f"{path}: {first_where}: cannot detect the format: expected an object with "
                "'messages' (chat) or 'instruction'/'output' (alpaca)"
            )
    out = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{path}: {where}: expected an object, got {type(row).__name__}")
        kind = detect_format(row)
        if kind is not None and kind != fmt:
            raise DataError(f"{path}: {where}: mixed formats: this row is {kind}, the dataset is {fmt}")
        problem = _check_chat(row) if fmt == "chat" else _check_alpaca(row)
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
