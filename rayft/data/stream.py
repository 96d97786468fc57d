"""The fused step's layout: every job's tokens in one padding-free stream.

Each job's packed rows are cut back to their real tokens and laid end to end, job after job, as one
`(1, N)` sequence. A job owns one contiguous token range of it, and its examples keep their own
boundaries (their lengths, in stream order, feed the variable-length attention) and positions
(restarting at 0 per example). So a job's cost and its dropout masks depend on its own tokens only,
never on how long its neighbours' rows are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import PackedBatch


@dataclass
class TokenStream:
    input_ids: torch.Tensor  # [1, N]
    targets: torch.Tensor  # [1, N]: as in the packed rows (-100 where no loss)
    position_ids: torch.Tensor  # [1, N]: restart at 0 per example
    lengths: list[int]  # every example's token count, in stream order
    owners: list[int]  # the input batch each example came from
    spans: list[tuple[int, int]]  # each input batch's token range [start, stop)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]


def example_lengths(batch: PackedBatch) -> list[int]:
    """Token counts of a packed batch's examples, row by row, in order (padding excluded)."""
    lengths = []
    for seq in batch.seq_ids.tolist():
        run, last = 0, None
        for s in seq:
            if s < 0:
                break  # padding only ever ends a row
            if s != last and run:
                lengths.append(run)
                run = 0
            run, last = run + 1, s
        if run:
            lengths.append(run)
    return lengths


def token_stream(batches: list[PackedBatch]) -> TokenStream:
    """The batches' real tokens as one stream, batch after batch (see the module docstring)."""
    if not batches:
        raise ValueError("token_stream needs at least one batch")
    ids, targets, positions, lengths, owners, spans, start = [], [], [], [], [], [], 0
    for k, b in enumerate(batches):
        real = b.seq_ids >= 0
        ids.append(b.input_ids[real])
        targets.append(b.targets[real])
        positions.append(b.position_ids[real])
        mine = example_lengths(b)
        lengths += mine
        owners += [k] * len(mine)
        spans.append((start, start + ids[-1].numel()))
        start = spans[-1][1]
    return TokenStream(torch.cat(ids)[None], torch.cat(targets)[None], torch.cat(positions)[None], lengths, owners,
                       spans)
