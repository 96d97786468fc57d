"""Datasets, prompt templates, response-only tokenisation and padding-free packing."""

from .encode import DEFAULT_TEMPLATE, Encoded, answer_text, encode_example, encode_examples, prompt_and_answer
from .formats import DataError, load_examples
from .packing import IGNORE, PackedBatch, Packer, PackReport
from .prepare import JobData, job_packer, job_steps, prepare_job_data
from .splits import load_splits
from .stream import TokenStream, token_stream

__all__ = [
    "DEFAULT_TEMPLATE",
    "IGNORE",
    "answer_text",
    "DataError",
    "Encoded",
    "JobData",
    "PackReport",
    "PackedBatch",
    "Packer",
    "job_packer",
    "job_steps",
    "encode_example",
    "encode_examples",
    "load_examples",
    "load_splits",
    "prepare_job_data",
    "prompt_and_answer",
    "TokenStream",
    "token_stream",
]
