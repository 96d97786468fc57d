"""The fused multi-adapter step: K jobs, one forward, a loss per job, one backward, K optimizers.

Every job's packed rows are cut to their real tokens and laid end to end as one `(1, N)` token
stream (`rayft.data.stream`), one contiguous token range per job. The frozen base runs once over
the stream; attention stays inside each example (`rayft.model.attention`: variable-length, no
`N x N` mask); each adapter touches only its own job's tokens. No job pays for another's length,
and nothing of a job (its dropout masks included) depends on what shares its step. The output head
runs only on each job's loss positions (prompt tokens need no logits). Since jobs never interact
(attention is per example, the base is frozen, the losses are summed), the gradient of the sum
hands every job exactly the gradient it would get alone.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rayft.adapters import AdapterModel, Segment
from rayft.data import IGNORE, token_stream
from rayft.model.attention import attention_layout, packed_attention
from rayft.model.stages import decoder_layers
from rayft.train.job import Job, StepRecord


@dataclass
class FusedStepStats:
    seconds: float
    tokens: int  # real tokens of all jobs
    pad_tokens: int  # padding in the fused batch: none, the stream is the jobs' real tokens
    records: dict[str, StepRecord]  # jobs that completed an optimizer step
    attention_pad_slots: int = 0  # slots the bucketed attention computed beyond the real tokens

    @property
    def padding(self) -> float:
        return self.pad_tokens / max(1, self.tokens + self.pad_tokens)


def compile_layers(decoder: torch.nn.Module, recompile_limit: int = 0) -> int:
    """torch.compile each decoder layer in place (the module tree, and so adapter routing, stays),
    with dynamic shapes so a step of another length or job set reuses the code. Dynamo's recompile
    limit is raised to at least `recompile_limit` and 4 per layer. Returns how many layers."""
    import torch._dynamo

    layers = decoder_layers(decoder)
    if layers is None:
        raise ValueError(f"{type(decoder).__name__}: no stack of decoder layers found to compile")
    # every layer is a guard set of its own: keep dynamo from giving up (and running eager) early
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob,
                    max(getattr(torch._dynamo.config, knob), 4 * len(layers), recompile_limit))
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@dataclass
class StreamInputs:
    """A token stream's inputs, on the device before the forward (a copy from pageable host memory
    waits for the stream, so one made mid-step would stall the queued kernels), and its loss.

    Loss positions, per-job weights and the attention's buckets are worked out on the CPU."""

    ids: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor  # (N,)
    where: torch.Tensor  # the loss positions of all jobs, in one index
    owner: torch.Tensor  # which job each loss position belongs to
    inv_window: torch.Tensor  # 1 / each job's loss tokens in its whole accumulation window
    layout: object | None  # the packed attention's buckets (None under flash attention)
    attention: object  # the context the forward runs in

    @classmethod
    def of(cls, stream, windows: list[int], device, attn_implementation: str, model) -> StreamInputs:
        targets = stream.targets[0]
        where = (targets != IGNORE).nonzero().squeeze(1)
        owner = torch.bucketize(where, torch.tensor([stop for _, stop in stream.spans]), right=True)
        inv_window = torch.tensor([1.0 / max(1, w) for w in windows])
        flash = attn_implementation.startswith("flash_attention")
        layout = None if flash else attention_layout(stream.lengths, attn_implementation, stream.owners)
        ids, positions, targets = (t.to(device) for t in (stream.input_ids, stream.position_ids, targets))
        where, owner, inv_window = (t.to(device) for t in (where, owner, inv_window))
        # flash attention finds the examples from the restarting positions itself (its varlen path)
        attention = nullcontext() if flash else packed_attention(model, layout.to(device))
        return cls(ids, positions, targets, where, owner, inv_window, layout, attention)

    def losses(self, head, hidden: torch.Tensor, jobs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(each job's loss, their sum to backpropagate). The output head runs once, on loss
        positions only (prompt tokens need no logits)."""
        logits = head(hidden.reshape(-1, hidden.shape[-1])[self.where]).float()
        token_loss = F.cross_entropy(logits, self.targets[self.where], reduction="none")
        per_job = torch.zeros(jobs, device=hidden.device).index_add_(0, self.owner, token_loss) * self.inv_window
        total = per_job.sum()
        if self.where.numel() == 0:  # no loss token at all: keep the graph whole, teach nothing
            total = total + 0.0 * hidden.sum()
        return per_job, total


class FusedEngine:
    def __init__(self, am: AdapterModel, device: torch.device | str, attn_implementation: str = "sdpa",
                 compile: bool = False):
        self.am = am
        self.model = am.model
        self.device = torch.device(device)
        # the attention the model was built with runs on each bucket of examples (the loader may
        # have chosen eager for a model without sdpa); the argument serves a model that does not say
        self.attn_implementation = getattr(self.model.config, "_attn_implementation", None) or attn_implementation
        self.decoder = self.model.get_decoder()
        self.head = self.model.get_output_embeddings()
        if compile:
            compile_layers(self.decoder)

    def micro_step(self, jobs: list[Job]) -> FusedStepStats:
        """One micro-batch of every job given (all must be unfinished). Losses and grad norms stay on
        the device until all K optimizers have been launched; the read-back at the end is the step's
        one host sync."""
        t0 = time.perf_counter()
        self.model.train()
        drawn = [j.next_micro_batch() for j in jobs]
        # jobs that can share a grouped LoRA computation side by side: same rank, similar sizes
        # (the order changes no job's result, only which of them a layer computes together)
        order = sorted(range(len(jobs)), key=lambda k: (jobs[k].adapter.variant, jobs[k].adapter.r,
                                                        drawn[k][0].num_tokens))
        jobs, drawn = [jobs[k] for k in order], [drawn[k] for k in order]
        stream = token_stream([b for b, _ in drawn])
        inputs = StreamInputs.of(stream, [w for _, w in drawn], self.device, self.attn_implementation, self.model)
        segments = [Segment(j.adapter.name, a, b) for j, (a, b) in zip(jobs, stream.spans)]
        with self.am.route(segments, per_token=True), inputs.attention:
            hidden = self.decoder(input_ids=inputs.ids, position_ids=inputs.positions, use_cache=False).last_hidden_state
        per_job, total = inputs.losses(self.head, hidden, len(jobs))
        total.backward()
        records = {}
        per_job = per_job.detach()
        for k, (j, (a, b)) in enumerate(zip(jobs, stream.spans)):
            rec = j.after_micro_batch(per_job[k], b - a, 0)  # a job pays for its own tokens only
            if rec is not None:
                records[j.name] = rec
        read_back(records.values())  # the one host sync of the step, after every optimizer launch
        pad_slots = 0 if inputs.layout is None else inputs.layout.padded_slots
        return FusedStepStats(time.perf_counter() - t0, stream.num_tokens, 0, records, pad_slots)

    def step(self, jobs: list[Job]) -> FusedStepStats:
        """Micro-steps until every job given has made one optimizer step (jobs may accumulate differently)."""
        pending = [j for j in jobs if not j.done]
        total = FusedStepStats(0.0, 0, 0, {})
        while pending:
            s = self.micro_step(pending)
            total.seconds += s.seconds
            total.tokens += s.tokens
            total.pad_tokens += s.pad_tokens
            total.attention_pad_slots += s.attention_pad_slots
            total.records.update(s.records)
            pending = [j for j in pending if j.name not in total.records]
        return total


def read_back(records) -> None:
    """Turn the records' device-tensor losses and grad norms into floats with one transfer."""
    fields = [(r, f) for r in records for f in ("loss", "grad_norm") if isinstance(getattr(r, f), torch.Tensor)]
    if fields:
        values = torch.stack([getattr(r, f).float() for r, f in fields]).tolist()
        for (r, f), v in zip(fields, values):
            setattr(r, f, v)
