"""The fused multi-adapter step: K jobs, one forward, a loss per job, one backward, K optimizers.

Jobs' packed rows are stacked into one batch, one contiguous row segment per job. The frozen base
runs once over all of it; each adapter touches only its own segment. The output head runs only on
each job's loss positions (prompt tokens need no logits). Since segments never interact (attention
is per row, the base is frozen, the losses are summed), the gradient of the sum hands every job
exactly the gradient it would get alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rayft.adapters import AdapterModel, Segment
from rayft.data import IGNORE, concat_batches, packed_attention_mask
from rayft.train.job import Job, StepRecord


@dataclass
class FusedStepStats:
    seconds: float
    tokens: int  # real tokens of all jobs
    padding: float  # padding fraction of the fused batch
    records: dict[str, StepRecord]  # jobs that completed an optimizer step in this micro-step


class FusedEngine:
    def __init__(self, am: AdapterModel, device: torch.device | str, attn_implementation: str = "sdpa"):
        self.am = am
        self.model = am.model
        self.device = torch.device(device)
        self.attn_implementation = attn_implementation
        self.decoder = self.model.get_decoder()
        self.head = self.model.get_output_embeddings()
        self.dtype = next(self.model.parameters()).dtype

    def micro_step(self, jobs: list[Job]) -> FusedStepStats:
        """One micro-batch of every job given (all must be unfinished)."""
        t0 = time.perf_counter()
        self.model.train()
        drawn = [j.next_micro_batch() for j in jobs]
        batches = [b for b, _ in drawn]
        batch, ranges = concat_batches(batches)
        batch = batch.to(self.device)
        mask = packed_attention_mask(batch.seq_ids, dtype=self.dtype, attn_implementation=self.attn_implementation)
        segments = [Segment(j.adapter.name, a, b) for j, (a, b) in zip(jobs, ranges)]
        with self.am.route(segments):
            hidden = self.decoder(
                input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids, use_cache=False
            ).last_hidden_state
        losses = [
            self._loss_sum(hidden[a:b], batch.targets[a:b]) / max(1, window_tokens)
            for (a, b), (_, window_tokens) in zip(ranges, drawn)
        ]
        torch.stack(losses).sum().backward()
        records = {}
        for j, loss, sub in zip(jobs, losses, batches):
            rec = j.after_micro_batch(loss.item(), sub.num_tokens, sub.num_pad)
            if rec is not None:
                records[j.name] = rec
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return FusedStepStats(time.perf_counter() - t0, batch.num_tokens, batch.padding_fraction, records)

    def _loss_sum(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross entropy over the positions that have a target (the caller normalises)."""
        where = targets != IGNORE
        if not bool(where.any()):
            return hidden.sum() * 0.0  # keeps the graph whole; this micro-batch teaches nothing
        logits = self.head(hidden[where]).float()
        return F.cross_entropy(logits, targets[where], reduction="sum")

    def step(self, jobs: list[Job]) -> FusedStepStats:
        """Micro-steps until every job given has made one optimizer step (jobs may accumulate differently)."""
        pending = [j for j in jobs if not j.done]
        total = FusedStepStats(0.0, 0, 0.0, {})
        pad_tokens = 0
        while pending:
            s = self.micro_step(pending)
            total.seconds += s.seconds
            total.tokens += s.tokens
            pad_tokens += round(s.padding * s.tokens / max(1e-9, 1 - s.padding)) if s.padding < 1 else 0
            total.records.update(s.records)
            pending = [j for j in pending if j.name not in total.records]
        total.padding = pad_tokens / max(1, total.tokens + pad_tokens)
        return total
