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
from rayft.data import IGNORE, block_causal_mask, concat_batches, needs_packed_mask
from rayft.train.job import Job, StepRecord


@dataclass
class FusedStepStats:
    seconds: float
    tokens: int  # real tokens of all jobs
    pad_tokens: int  # padding in the fused batch
    records: dict[str, StepRecord]  # jobs that completed an optimizer step

    @property
    def padding(self) -> float:
        return self.pad_tokens / max(1, self.tokens + self.pad_tokens)


class FusedEngine:
    def __init__(self, am: AdapterModel, device: torch.device | str, attn_implementation: str = "sdpa"):
        self.am = am
        self.model = am.model
        self.device = torch.device(device)
        # the attention the model was built with decides the mask's form (the loader may have
        # chosen eager for a model without sdpa); the argument serves a model that does not say
        self.attn_implementation = getattr(self.model.config, "_attn_implementation", None) or attn_implementation
        self.decoder = self.model.get_decoder()
        self.head = self.model.get_output_embeddings()
        self.dtype = next(self.model.parameters()).dtype

    def micro_step(self, jobs: list[Job]) -> FusedStepStats:
        """One micro-batch of every job given (all must be unfinished).

        Loss positions and per-job weights are worked out on the CPU and every input is copied
        before the forward; losses and grad norms stay on the device until all K optimizers have
        been launched. What still syncs: transformers' packed-sequence probe at the start of the
        forward (it runs whenever no mask is given) and the read-back at the end."""
        t0 = time.perf_counter()
        self.model.train()
        drawn = [j.next_micro_batch() for j in jobs]
        batches = [b for b, _ in drawn]
        batch, ranges = concat_batches(batches)
        masked = needs_packed_mask(batch.seq_ids)  # decided on the CPU copy; the mask is built on the device
        # loss positions of all jobs, in one index, and which job each belongs to
        flat_targets = batch.targets.view(-1)
        where = (flat_targets != IGNORE).nonzero().squeeze(1)
        row_len = batch.targets.shape[1]
        owner = torch.bucketize(where, torch.tensor([b * row_len for _, b in ranges]), right=True)
        inv_window = torch.tensor([1.0 / max(1, w) for _, w in drawn])

        # every input goes to the device before the forward: a copy from pageable host memory
        # waits for the stream, so one made mid-step would stall the queued kernels
        dev = self.device
        batch = batch.to(dev)
        where, owner, inv_window = (t.to(dev) for t in (where, owner, inv_window))
        flat_targets = batch.targets.view(-1)
        mask = None
        if masked:
            mask = block_causal_mask(batch.seq_ids, dtype=self.dtype, attn_implementation=self.attn_implementation)
        # Without a mask every row is one example starting at column 0, so default positions are the
        # same for its tokens; passing none keeps transformers' packed-sequence probe from seeing
        # end padding as a new sequence and building a mask that costs sdpa its causal fast path.
        positions = None if mask is None else batch.position_ids
        segments = [Segment(j.adapter.name, a, b) for j, (a, b) in zip(jobs, ranges)]
        with self.am.route(segments):
            hidden = self.decoder(
                input_ids=batch.input_ids, attention_mask=mask, position_ids=positions, use_cache=False
            ).last_hidden_state
        # the output head runs once, on loss positions only (prompt tokens need no logits)
        logits = self.head(hidden.reshape(-1, hidden.shape[-1])[where]).float()
        token_loss = F.cross_entropy(logits, flat_targets[where], reduction="none")
        per_job = torch.zeros(len(jobs), device=dev).index_add_(0, owner, token_loss) * inv_window
        total = per_job.sum()
        if where.numel() == 0:  # no loss token at all: keep the graph whole, teach nothing
            total = total + 0.0 * hidden.sum()
        total.backward()
        records = {}
        per_job = per_job.detach()
        for k, (j, sub) in enumerate(zip(jobs, batches)):
            rec = j.after_micro_batch(per_job[k], sub.num_tokens, sub.num_pad)
            if rec is not None:
                records[j.name] = rec
        _read_back(records.values())  # the one host sync of the step, after every optimizer launch
        return FusedStepStats(time.perf_counter() - t0, batch.num_tokens, batch.num_pad, records)

    def step(self, jobs: list[Job]) -> FusedStepStats:
        """Micro-steps until every job given has made one optimizer step (jobs may accumulate differently)."""
        pending = [j for j in jobs if not j.done]
        total = FusedStepStats(0.0, 0, 0, {})
        while pending:
            s = self.micro_step(pending)
            total.seconds += s.seconds
            total.tokens += s.tokens
            total.pad_tokens += s.pad_tokens
            total.records.update(s.records)
            pending = [j for j in pending if j.name not in total.records]
        return total


def _read_back(records) -> None:
    """Turn the records' device-tensor losses and grad norms into floats with one transfer."""
    fields = [(r, f) for r in records for f in ("loss", "grad_norm") if isinstance(getattr(r, f), torch.Tensor)]
    if fields:
        values = torch.stack([getattr(r, f).float() for r, f in fields]).tolist()
        for (r, f), v in zip(fields, values):
            setattr(r, f, v)
