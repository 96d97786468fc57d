"""Datasets, prompt templates, response-only tokenisation and padding-free packing."""

from .encode import DEFAULT_TEMPLATE, Encoded, answer_text, encode_example, encode_examples, prompt_and_answer
from .formats import DataError, load_examples
from .mask import block_causal_mask, needs_packed_mask, packed_attention_mask
from .packing import IGNORE, PackedBatch, Packer, PackReport, concat_batches
from .prepare import JobData, job_packer, job_steps, prepare_job_data
from .splits import load_splits

__all__ = [
    "DEFAULT_TEMPLATE",
    "IGNORE",
    "answer_text",
    "block_causal_mask",
    "DataError",
    "Encoded",
    "JobData",
    "PackReport",
    "PackedBatch",
    "Packer",
    "concat_batches",
    "job_packer",
    "job_steps",
    "encode_example",
    "encode_examples",
    "load_examples",
    "load_splits",
    "needs_packed_mask",
    "packed_attention_mask",
    "prepare_job_data",
    "prompt_and_answer",
]
