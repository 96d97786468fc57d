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
    rows = max(1, jc.tokens_per_micro_batch // jc.max_seq_len)
    packer = Packer(encoded, jc.max_seq_len, rows, seed=jc.seed, long_examples=jc.long_examples,
                    pad_id=tokenizer.pad_token_id, source=str(ds.path))
    accum = jc.optimizer.grad_accumulation
    total = jc.steps if jc.steps is not None else math.ceil(jc.epochs * packer.batches_per_epoch() / accum)
    majority = Counter(map(answer_text, train_rows)).most_common(1)[0][0]
    return JobData(train_rows, eval_rows, packer, max(1, total), majority)
