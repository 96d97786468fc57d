"""A job's data, read, encoded and packed exactly as training will use it.

One function for `rayft train` (the trainer) and `rayft validate`: whatever validate says about a
dataset is what train would do with it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from rayft.config import DatasetConfig, JobConfig

from .encode import answer_text, encode_examples
from .formats import DataError, detect_format
from .packing import Example, Packer, PackReport
from .pairs import encode_pairs
from .splits import load_splits


@dataclass
class JobData:
    train_rows: list[dict]
    eval_rows: list[dict]
    packer: Packer
    total_steps: int  # optimizer steps the job will make
    majority_answer: str | None  # the training set's most common answer (the score of always guessing it)

    @property
    def report(self) -> PackReport:
        return self.packer.report


def prepare_job_data(jc: JobConfig, ds: DatasetConfig, tokenizer) -> JobData:
    """Load, split, encode and pack one job's dataset; a DataError names the file, and the line or
    example, of what makes it unusable (malformed rows, nothing left to learn after truncation)."""
    train_rows, eval_rows = load_splits(ds)
    fmt, preference = detect_format(train_rows[0]), jc.task != "sft"
    if preference != (fmt == "preference"):
        need = "preference rows (prompt, chosen, rejected)" if preference else "alpaca or chat rows"
        raise DataError(f"{ds.path}: task {jc.task} needs {need}, this dataset has {fmt} rows")
    if preference:
        encoded = encode_pairs(train_rows, tokenizer, source=str(ds.path))
        majority = None
    else:
        encoded = encode_examples(train_rows, tokenizer, ds.template, source=str(ds.path))
        majority = Counter(map(answer_text, train_rows)).most_common(1)[0][0]
    packer = job_packer(jc, encoded, tokenizer.pad_token_id, source=str(ds.path))
    return JobData(train_rows, eval_rows, packer, job_steps(jc, packer), majority)


def job_packer(jc: JobConfig, encoded: list[Example], pad_id: int, source: str = "") -> Packer:
    """A job's stream of micro-batches: rows of max_seq_len, as many as its token budget holds. A
    preference job's rows hold a pair each (two sequences of up to max_seq_len)."""
    row_len = jc.max_seq_len * (1 if jc.task == "sft" else 2)
    rows = max(1, jc.tokens_per_micro_batch // row_len)
    return Packer(encoded, row_len, rows, seed=jc.seed, long_examples=jc.long_examples, pad_id=pad_id,
                  source=source, sequence_len=jc.max_seq_len)


def job_steps(jc: JobConfig, packer: Packer) -> int:
    """The optimizer steps a job makes: its `steps`, or its `epochs` of the packer's batches."""
    if jc.steps is not None:
        return max(1, jc.steps)
    return max(1, math.ceil(jc.epochs * packer.batches_per_epoch() / jc.optimizer.grad_accumulation))
