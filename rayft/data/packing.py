"""Padding-free packing: examples laid end to end in fixed-length rows, in a seeded order per epoch.

An example is one sequence, or a preference pair (`EncodedPair`: chosen then rejected, side by side
in one row, so a pair is never split across micro-batches). Each sequence is cut to `sequence_len`.

Each epoch's order is cut into windows of `window` examples; a window is packed first-fit
decreasing (longest first, each into the first row with room), which leaves far less padding than
packing in order, and its rows are then shuffled. The stream of batches is a pure function of
(examples, row_len, rows_per_batch, window, seed) and the cursor (epoch, window start, rows of that
window already given out), so restoring the cursor restores the future.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

import torch

from .encode import Encoded
from .formats import DataError
from .pairs import EncodedPair

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

    @property
    def num_sequences(self) -> int:
        """Sequences in the batch (a preference pair is two)."""
        return int((self.seq_ids.max(dim=1).values + 1).sum())

    @property
    def num_chosen_loss_tokens(self) -> int:
        """Loss tokens of the chosen answers, in a batch of preference pairs (each row's even sequences)."""
        return int(((self.targets != IGNORE) & (self.seq_ids % 2 == 0)).sum())

    @property
    def num_chosen_predicted(self) -> int:
        """Tokens predicted in the chosen sequences, prompt included (each sequence's all but first)."""
        chosen = (self.seq_ids >= 0) & (self.seq_ids % 2 == 0)
        return int(chosen.sum()) - (self.num_sequences + 1) // 2

    def to(self, device) -> PackedBatch:
        t = {k: getattr(self, k).to(device) for k in ("input_ids", "targets", "position_ids", "seq_ids")}
        return PackedBatch(**t, num_tokens=self.num_tokens, num_pad=self.num_pad)


@dataclass
class PackReport:
    examples: int  # examples given
    truncated: int
    skipped: int
    tokens: int  # tokens of the examples kept, after truncation
    loss_tokens: int = 0  # tokens the loss is taken on, in the examples kept
    no_loss: int = 0  # examples kept with no loss token left (truncation cut off their whole answer)
    cut_pairs: int = 0  # preference pairs left out: truncation cut off one answer entirely

    @property
    def kept(self) -> int:
        return self.examples - self.skipped - self.cut_pairs

    def warnings(self, row_len: int, long_examples: str) -> list[str]:
        """What a user should hear about this dataset before training on it."""
        out = []
        if self.truncated or self.skipped:
            what = "truncated" if long_examples == "truncate" else "skipped"
            out.append(f"{self.truncated + self.skipped} of {self.examples} examples longer than "
                       f"max_seq_len={row_len} were {what}")
        if self.no_loss:
            out.append(f"{self.no_loss} of {self.examples} examples kept no answer token after truncation "
                       f"to max_seq_len={row_len} (they teach nothing)")
        if self.cut_pairs:
            out.append(f"{self.cut_pairs} of {self.examples} pairs lost a whole answer to truncation at "
                       f"max_seq_len={row_len} and were left out")
        return out


Example = Encoded | EncodedPair


def sequences(e: Example) -> tuple[Encoded, ...]:
    return e.sequences if isinstance(e, EncodedPair) else (e,)


def loss_tokens(e: Example) -> int:
    """Tokens of an example the loss is taken on: a target is the next token, so a sequence's first never is."""
    return sum(sum(s.loss_mask[1:]) for s in sequences(e))


def _cut(e: Example, sequence_len: int) -> Example:
    if isinstance(e, EncodedPair):
        return EncodedPair(*(_cut(s, sequence_len) for s in e.sequences))
    return Encoded(e.input_ids[:sequence_len], e.loss_mask[:sequence_len])


def _pack_rows(rows: list[list[Example]], row_len: int, pad_id: int) -> PackedBatch:
    cols = ([], [], [], [])
    for items in rows:
        ids, tgt, pos, seq = [], [], [], []
        for j, e in enumerate(s for example in items for s in sequences(example)):
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
        encoded: list[Example],
        row_len: int,
        rows_per_batch: int = 1,
        seed: int = 0,
        long_examples: Literal["truncate", "skip"] = "truncate",
        pad_id: int = 0,
        window: int = 256,
        source: str = "",
        sequence_len: int | None = None,
    ):
        if row_len < 1 or rows_per_batch < 1:
            raise ValueError(f"row_len ({row_len}) and rows_per_batch ({rows_per_batch}) must be >= 1")
        if long_examples not in ("truncate", "skip"):
            raise ValueError(f"long_examples must be 'truncate' or 'skip', got {long_examples!r}")
        self.row_len, self.rows_per_batch, self.seed, self.pad_id = row_len, rows_per_batch, seed, pad_id
        self.window = max(1, window)
        self.sequence_len = min(sequence_len or row_len, row_len)
        self.examples: list[Example] = []
        truncated = skipped = cut_pairs = 0
        for e in encoded:
            if len(e) > row_len or any(len(s) > self.sequence_len for s in sequences(e)):
                if long_examples == "skip":
                    skipped += 1
                    continue
                e = _cut(e, self.sequence_len)
                truncated += 1
            if any(len(s) == 0 for s in sequences(e)):
                skipped += 1
                continue
            if isinstance(e, EncodedPair) and not all(loss_tokens(s) for s in e.sequences):
                truncated, cut_pairs = truncated - 1, cut_pairs + 1  # an answer cut away: nothing to compare
                continue
            self.examples.append(e)
        where = f"{source}: " if source else ""
        if not self.examples:
            raise DataError(
                f"{where}no examples left to pack: {len(encoded)} given, {skipped} skipped "
                f"(longer than max_seq_len={self.sequence_len} with long_examples={long_examples!r}, or empty)"
                + (f", {cut_pairs} pairs with an answer cut away entirely" if cut_pairs else "")
            )
        per_example = [loss_tokens(e) for e in self.examples]
        self.report = PackReport(len(encoded), truncated, skipped, sum(len(e) for e in self.examples),
                                 sum(per_example), per_example.count(0), cut_pairs)
        if not self.report.loss_tokens:
            # training on it would be a no-op adapter reported as done
            raise DataError(
                f"{where}no loss tokens: none of the {len(self.examples)} examples kept has an answer token "
                f"left within max_seq_len={self.sequence_len} ({truncated} truncated); raise max_seq_len or shorten the prompts"
            )
        self.epoch = 0
        self.index = 0  # start, in this epoch's order, of the window being given out
        self.row = 0  # rows of that window already given out
        self._orders: dict[int, list[int]] = {}
        self._rows: tuple[tuple[int, int], list[list[Example]]] | None = None

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            # A string seed hashes deterministically (sha512), independent of the global RNG and process.
            order = list(range(len(self.examples)))
            random.Random(f"rayft-pack:{self.seed}:{epoch}").shuffle(order)
            self._orders = {epoch: order}  # only the current epoch is needed again
        return self._orders[epoch]

    def _window_rows(self, epoch: int, index: int) -> list[list[Example]]:
        """The rows of the window starting at `index` of `epoch`'s order (cached for the current one)."""
        if self._rows is not None and self._rows[0] == (epoch, index):
            return self._rows[1]
        ids = self._order(epoch)[index : index + self.window]
        rows: list[list[Example]] = []
        free: list[int] = []
        for i in sorted(ids, key=lambda i: -len(self.examples[i])):  # stable: ties keep their order
            e = self.examples[i]
            r = next((r for r, room in enumerate(free) if len(e) <= room), None)
            if r is None:
                rows.append([])
                free.append(self.row_len)
                r = len(rows) - 1
            rows[r].append(e)
            free[r] -= len(e)
        # longest-first would otherwise put a window's long examples in its first batches
        random.Random(f"rayft-rows:{self.seed}:{epoch}:{index}").shuffle(rows)
        self._rows = ((epoch, index), rows)
        return rows

    def _advance(self, epoch: int, index: int) -> tuple[int, int]:
        index += self.window
        return (epoch + 1, 0) if index >= len(self.examples) else (epoch, index)

    def next_batch(self) -> PackedBatch:
        rows = []
        while len(rows) < self.rows_per_batch:
            window = self._window_rows(self.epoch, self.index)
            take = window[self.row : self.row + self.rows_per_batch - len(rows)]
            rows += take
            self.row += len(take)
            if self.row == len(window):  # move on at once, so the cursor names what comes next
                (self.epoch, self.index), self.row = self._advance(self.epoch, self.index), 0
        return _pack_rows(rows, self.row_len, self.pad_id)

    def __iter__(self):
        while True:
            yield self.next_batch()

    @property
    def progress(self) -> float:
        """Epochs consumed so far, fractional."""
        done = self.row / max(1, len(self._window_rows(self.epoch, self.index)))
        return self.epoch + min(len(self.examples), self.index + done * self.window) / len(self.examples)

    def batches_per_epoch(self) -> int:
        rows, index = 0, 0
        while index < len(self.examples):
            rows += len(self._window_rows(0, index))
            index += self.window
        return math.ceil(rows / self.rows_per_batch)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "row": self.row,
            "seed": self.seed,
            "window": self.window,
            "row_len": self.row_len,
            "num_examples": len(self.examples),
            "num_tokens": self.report.tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "row_len", "window", "num_examples", "num_tokens"):
            if state[key] != mine[key]:
                raise DataError(
                    f"packer state does not match this dataset/setup: {key} is {state[key]} in the "
                    f"checkpoint, {mine[key]} here"
                )
        self.epoch, self.index, self.row = int(state["epoch"]), int(state["index"]), int(state["row"])
