"""A job's data, read, encoded and packed exactly as training will use it.

One function for `rayft train` (the trainer) and `rayft validate`: whatever validate says about a
dataset is what train would do with it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from rayft.config import DatasetConfig, JobConfig

from .encode import Encoded, answer_text, encode_examples
from .packing import Packer, PackReport
from .splits import load_splits


@dataclass
class JobData:
    train_rows: list[dict]
    eval_rows: list[dict]
    packer: Packer
    total_steps: int  # optimizer steps the job will make
    majority_answer: str  # the training set's most common answer (the score of always guessing it)

    @property
    def report(self) -> PackReport:
        return self.packer.report


def prepare_job_data(jc: JobConfig, ds: DatasetConfig, tokenizer) -> JobData:
    """Load, split, encode and pack one job's dataset; a DataError names the file, and the line or
    example, of what makes it unusable (malformed rows, nothing left to learn after truncation)."""
    train_rows, eval_rows = load_splits(ds)
    encoded = encode_examples(train_rows, tokenizer, ds.template, source=str(ds.path))
    packer = job_packer(jc, encoded, tokenizer.pad_token_id, source=str(ds.path))
    majority = Counter(map(answer_text, train_rows)).most_common(1)[0][0]
    return JobData(train_rows, eval_rows, packer, job_steps(jc, packer), majority)


def job_packer(jc: JobConfig, encoded: list[Encoded], pad_id: int, source: str = "") -> Packer:
    """A job's stream of micro-batches: rows of max_seq_len, as many as its token budget holds."""
    rows = max(1, jc.tokens_per_micro_batch // jc.max_seq_len)
    return Packer(encoded, jc.max_seq_len, rows, seed=jc.seed, long_examples=jc.long_examples, pad_id=pad_id,
                  source=source)


def job_steps(jc: JobConfig, packer: Packer) -> int:
    """The optimizer steps a job makes: its `steps`, or its `epochs` of the packer's batches."""
    if jc.steps is not None:
        return max(1, jc.steps)
    return max(1, math.ceil(jc.epochs * packer.batches_per_epoch() / jc.optimizer.grad_accumulation))
