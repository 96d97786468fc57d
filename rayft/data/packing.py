"""Padding-free packing: examples laid end to end in fixed-length rows, in a seeded order per epoch.

The stream of batches is a pure function of (examples, row_len, rows_per_batch, seed) and the
cursor (epoch, index): every batch starts on fresh rows, so restoring the cursor restores the future.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .encode import Encoded
from .formats import DataError

IGNORE = -100


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [R, L]
    targets: torch.Tensor  # [R, L]: next token where it is a loss token of the same example, else -100
    position_ids: torch.Tensor  # [R, L]: restart at 0 per example; 0 on padding
    seq_ids: torch.Tensor  # [R, L]: example index within the row; -1 on padding
    num_tokens: int  # real (non-padding) tokens
    num_pad: int

    @property
    def padding_fraction(self) -> float:
        total = self.num_tokens + self.num_pad
        return self.num_pad / total if total else 0.0

    @property
    def num_loss_tokens(self) -> int:
        return int((self.targets != IGNORE).sum())

    def to(self, device) -> PackedBatch:
        t = {k: getattr(self, k).to(device) for k in ("input_ids", "targets", "position_ids", "seq_ids")}
        return PackedBatch(**t, num_tokens=self.num_tokens, num_pad=self.num_pad)


@dataclass
class PackReport:
    examples: int  # examples given
    truncated: int
    skipped: int
    tokens: int  # tokens of the examples kept, after truncation

    @property
    def kept(self) -> int:
        return self.examples - self.skipped


def _pack_rows(rows: list[list[Encoded]], row_len: int, pad_id: int) -> PackedBatch:
    cols = ([], [], [], [])
    for items in rows:
        ids, tgt, pos, seq = [], [], [], []
        for j, e in enumerate(items):
            ids += e.input_ids
            tgt += [t if m else IGNORE for t, m in zip(e.input_ids[1:], e.loss_mask[1:])] + [IGNORE]
            pos += range(len(e))
            seq += [j] * len(e)
        pad = row_len - len(ids)
        for col, vals, fill in zip(cols, (ids, tgt, pos, seq), (pad_id, IGNORE, 0, -1)):
            col.append(vals + [fill] * pad)
    ids, tgt, pos, seq = (torch.tensor(c, dtype=torch.long).view(len(rows), row_len) for c in cols)
    real = int((seq >= 0).sum())
    return PackedBatch(ids, tgt, pos, seq, num_tokens=real, num_pad=seq.numel() - real)


class Packer:
    def __init__(
        self,
        encoded: list[Encoded],
        row_len: int,
        rows_per_batch: int = 1,
        seed: int = 0,
        long_examples: Literal["truncate", "skip"] = "truncate",
        pad_id: int = 0,
    ):
        if row_len < 1 or rows_per_batch < 1:
            raise ValueError(f"row_len ({row_len}) and rows_per_batch ({rows_per_batch}) must be >= 1")
        if long_examples not in ("truncate", "skip"):
            raise ValueError(f"long_examples must be 'truncate' or 'skip', got {long_examples!r}")
        self.row_len, self.rows_per_batch, self.seed, self.pad_id = row_len, rows_per_batch, seed, pad_id
        self.examples: list[Encoded] = []
        truncated = skipped = 0
        for e in encoded:
            if len(e) > row_len:
                if long_examples == "skip":
                    skipped += 1
                    continue
                e = Encoded(e.input_ids[:row_len], e.loss_mask[:row_len])
                truncated += 1
            if len(e) == 0:
                skipped += 1
                continue
            self.examples.append(e)
        if not self.examples:
            raise DataError(
                f"no examples left to pack: {len(encoded)} given, {skipped} skipped "
                f"(longer than row_len={row_len} with long_examples={long_examples!r}, or empty)"
            )
        self.report = PackReport(len(encoded), truncated, skipped, sum(len(e) for e in self.examples))
        self.epoch = 0
        self.index = 0  # position in this epoch's order of the next example to pack
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            # A string seed hashes deterministically (sha512), independent of the global RNG and process.
            order = list(range(len(self.examples)))
            random.Random(f"rayft-pack:{self.seed}:{epoch}").shuffle(order)
            self._orders = {epoch: order}  # only the current epoch is needed again
        return self._orders[epoch]

    def _fill_row(self, epoch: int, index: int, cross_epochs: bool) -> tuple[list[Encoded], int, int]:
        n, items, space = len(self.examples), [], self.row_len
        while True:
            if index == n:
                if not cross_epochs:
                    break
                epoch, index = epoch + 1, 0
            e = self.examples[self._order(epoch)[index]]
            if len(e) > space:
                break
            items.append(e)
            space -= len(e)
            index += 1
        return items, epoch, index

    def next_batch(self) -> PackedBatch:
        rows = []
        for _ in range(self.rows_per_batch):
            items, self.epoch, self.index = self._fill_row(self.epoch, self.index, cross_epochs=True)
            rows.append(items)
        return _pack_rows(rows, self.row_len, self.pad_id)

    def __iter__(self):
        while True:
            yield self.next_batch()

    @property
    def progress(self) -> float:
        """Epochs consumed so far, fractional."""
        return self.epoch + self.index / len(self.examples)

    def batches_per_epoch(self) -> int:
        rows, index = 0, 0
        while index < len(self.examples):
            _, _, index = self._fill_row(0, index, cross_epochs=False)
            rows += 1
        return math.ceil(rows / self.rows_per_batch)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "row_len": self.row_len,
            "num_examples": len(self.examples),
            "num_tokens": self.report.tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "row_len", "num_examples", "num_tokens"):
            if state[key] != mine[key]:
                raise DataError(
                    f"packer state does not match this dataset/setup: {key} is {state[key]} in the "
                    f"checkpoint, {mine[key]} here"
                )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def concat_batches(batches: list[PackedBatch]) -> tuple[PackedBatch, list[tuple[int, int]]]:
    """Stack several jobs' rows into one batch (right-padding rows to the longest); returns the batch
    and each input's row range [start, stop)."""
    if not batches:
        raise ValueError("concat_batches needs at least one batch")
    width = max(b.input_ids.shape[1] for b in batches)
    fills = {"input_ids": 0, "targets": IGNORE, "position_ids": 0, "seq_ids": -1}
    cols = {k: [] for k in fills}
    segments, start = [], 0
    for b in batches:
        for k, fill in fills.items():
            t = getattr(b, k)
            cols[k].append(F.pad(t, (0, width - t.shape[1]), value=fill))
        segments.append((start, start + b.input_ids.shape[0]))
        start += b.input_ids.shape[0]
    out = {k: torch.cat(v) for k, v in cols.items()}
    real = sum(b.num_tokens for b in batches)
    return PackedBatch(**out, num_tokens=real, num_pad=out["seq_ids"].numel() - real), segments
