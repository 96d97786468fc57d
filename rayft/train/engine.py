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
from rayft.config import JobConfig
from rayft.data import IGNORE, token_stream
from rayft.model.attention import attention_layout, packed_attention
from rayft.model.stages import decoder_layers
from rayft.train import preference
from rayft.train.job import Job, StepRecord, Window


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


def _cross_entropy(head, hidden: torch.Tensor, where: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per position, the cross entropy of the output head at stream positions `where`."""
    logits = head(hidden.reshape(-1, hidden.shape[-1])[where]).float()
    return F.cross_entropy(logits, targets, reduction="none")


@dataclass
class _PreferenceJob:
    index: int  # the job's place in the stream
    cfg: JobConfig
    window: Window
    sequences: tuple[int, int]  # its sequences' range in the stream: chosen, rejected, chosen, ...


def _orpo_prompts(stream, targets: torch.Tensor, pairs: list[_PreferenceJob]) -> list[torch.Tensor]:
    """(positions, next tokens, owners) of the prompt tokens of ORPO jobs' chosen sequences, whose
    NLL TRL's ORPOTrainer counts beside the answer's; [] when the stream has no ORPO job."""
    starts = [0]
    for n in stream.lengths:
        starts.append(starts[-1] + n)
    ignored = (targets == IGNORE).tolist()
    where, owner = [], []
    for p in pairs:
        if p.cfg.task != "orpo":
            continue
        a, b = p.sequences
        for i in range(a, b, 2):  # its chosen sequences
            for pos in range(starts[i], starts[i + 1] - 1):
                if ignored[pos]:
                    where.append(pos)
                    owner.append(p.index)
    if not where:
        return []
    where_t = torch.tensor(where)
    return [where_t, stream.input_ids[0, where_t + 1], torch.tensor(owner)]


@dataclass
class StreamInputs:
    """A token stream's inputs, on the device before the forward (a copy from pageable host memory
    waits for the stream, so one made mid-step would stall the queued kernels), and its loss.

    Loss positions, per-job weights, the sequences of preference pairs and the attention's buckets
    are worked out on the CPU."""

    ids: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor  # (N,)
    where: torch.Tensor  # the loss positions of all jobs, in one index
    owner: torch.Tensor  # which job each loss position belongs to
    inv_window: torch.Tensor  # 1 / each job's loss tokens in its whole accumulation window
    layout: object | None  # the packed attention's buckets (None under flash attention)
    attention: object  # the context the forward runs in
    sequence: torch.Tensor  # which sequence (example) of the stream each loss position is in
    sequences: int
    pairs: list[_PreferenceJob]  # the preference jobs
    sequence_tokens: torch.Tensor | None = None  # loss tokens per sequence (with preference jobs)
    chosen: torch.Tensor | None = None  # 1.0 at loss positions of chosen answers (with preference jobs)
    # ORPO jobs' chosen prompts: the positions (and next tokens, owners) their NLL also counts
    prompt_where: torch.Tensor | None = None
    prompt_targets: torch.Tensor | None = None
    prompt_owner: torch.Tensor | None = None

    @classmethod
    def of(cls, stream, windows: list[Window], device, attn_implementation: str, model,
           configs: list[JobConfig] | None = None) -> StreamInputs:
        targets = stream.targets[0]
        where = (targets != IGNORE).nonzero().squeeze(1)
        owner = torch.bucketize(where, torch.tensor([stop for _, stop in stream.spans]), right=True)
        inv_window = torch.tensor([1.0 / max(1, w.loss_tokens) for w in windows])
        flash = attn_implementation.startswith("flash_attention")
        layout = None if flash else attention_layout(stream.lengths, attn_implementation, stream.owners)
        ends = torch.tensor(stream.lengths).cumsum(0)
        sequence = torch.bucketize(where, ends, right=True)
        pairs, sequence_tokens, chosen = [], None, None
        for k, cfg in enumerate(configs or []):
            if cfg.task != "sft":
                mine = [i for i, o in enumerate(stream.owners) if o == k]
                pairs.append(_PreferenceJob(k, cfg, windows[k], (mine[0], mine[-1] + 1)))
        if pairs:
            sequence_tokens = torch.bincount(sequence, minlength=len(stream.lengths)).float()
            first = torch.tensor([next(i for i, o in enumerate(stream.owners) if o == k) if k in stream.owners else 0
                                  for k in range(len(stream.spans))])
            chosen = ((sequence - first[owner]) % 2 == 0).float()
        prompts = _orpo_prompts(stream, targets, pairs)
        ids, positions, targets = (t.to(device) for t in (stream.input_ids, stream.position_ids, targets))
        where, owner, inv_window, sequence = (t.to(device) for t in (where, owner, inv_window, sequence))
        if pairs:
            sequence_tokens, chosen = sequence_tokens.to(device), chosen.to(device)
        prompts = [t.to(device) for t in prompts] if prompts else [None] * 3
        # flash attention finds the examples from the restarting positions itself (its varlen path)
        attention = nullcontext() if flash else packed_attention(model, layout.to(device))
        return cls(ids, positions, targets, where, owner, inv_window, layout, attention, sequence,
                   len(stream.lengths), pairs, sequence_tokens, chosen, *prompts)

    def token_losses(self, head, hidden: torch.Tensor) -> torch.Tensor:
        """Cross entropy at every loss position. The output head runs once, on loss positions only
        (prompt tokens need no logits)."""
        return _cross_entropy(head, hidden, self.where, self.targets[self.where])

    def sequence_logps(self, token_loss: torch.Tensor) -> torch.Tensor:
        """Each sequence's log-probability of its loss tokens (summed)."""
        return torch.zeros(self.sequences, device=token_loss.device).index_add_(0, self.sequence, -token_loss)

    def losses(self, head, hidden: torch.Tensor, jobs: int, reference: dict[int, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, dict[int, dict]]:
        """(each job's loss, their sum to backpropagate, each preference job's metrics). An SFT job's
        loss is its token mean; a preference job's is its pairs' mean (`rayft.train.preference`), DPO's
        against `reference`: the reference's log-probability of each of that job's sequences."""
        token_loss = self.token_losses(head, hidden)
        per_job = torch.zeros(jobs, device=hidden.device).index_add_(0, self.owner, token_loss) * self.inv_window
        metrics: dict[int, dict] = {}
        if self.pairs:
            logps = self.sequence_logps(token_loss)
            chosen_nll = torch.zeros(jobs, device=hidden.device).index_add_(0, self.owner, token_loss * self.chosen)
            if self.prompt_where is not None:
                prompt_loss = _cross_entropy(head, hidden, self.prompt_where, self.prompt_targets)
                chosen_nll = chosen_nll.index_add(0, self.prompt_owner, prompt_loss)
            parts = list(per_job.unbind())
            for p in self.pairs:
                a, b = p.sequences
                ref = None if reference is None else reference.get(p.index)
                pair = preference.pair_losses(p.cfg, logps[a:b:2], logps[a + 1:b:2], self.sequence_tokens[a:b:2],
                                              self.sequence_tokens[a + 1:b:2], ref)
                loss = pair.losses.sum() / max(1, p.window.pairs)
                m = {k: v.sum() / max(1, p.window.pairs) for k, v in pair.metrics.items()}
                if p.cfg.task in ("cpo", "orpo"):
                    nll = chosen_nll[p.index] / max(1, p.window.chosen_tokens)
                    loss = loss + (p.cfg.preference.cpo_alpha if p.cfg.task == "cpo" else 1.0) * nll
                    m["nll_loss"] = nll.detach()
                parts[p.index], metrics[p.index] = loss, m
            per_job = torch.stack(parts)
        total = per_job.sum()
        if self.where.numel() == 0:  # no loss token at all: keep the graph whole, teach nothing
            total = total + 0.0 * hidden.sum()
        return per_job, total, metrics


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
        configs = [j.cfg for j in jobs]
        inputs = StreamInputs.of(stream, [w for _, w in drawn], self.device, self.attn_implementation, self.model,
                                 configs)
        reference = self.reference_logps(jobs, drawn)
        segments = [Segment(j.adapter.name, a, b) for j, (a, b) in zip(jobs, stream.spans)]
        with self.am.route(segments, per_token=True), inputs.attention:
            hidden = self.decoder(input_ids=inputs.ids, position_ids=inputs.positions, use_cache=False).last_hidden_state
        per_job, total, metrics = inputs.losses(self.head, hidden, len(jobs), reference)
        total.backward()
        records = {}
        per_job = per_job.detach()
        for k, (j, (a, b)) in enumerate(zip(jobs, stream.spans)):
            rec = j.after_micro_batch(per_job[k], b - a, 0, metrics.get(k))  # a job pays for its own tokens only
            if rec is not None:
                records[j.name] = rec
        read_back(records.values())  # the one host sync of the step, after every optimizer launch
        pad_slots = 0 if inputs.layout is None else inputs.layout.padded_slots
        return FusedStepStats(time.perf_counter() - t0, stream.num_tokens, 0, records, pad_slots)

    @torch.no_grad()
    def reference_logps(self, jobs: list[Job], drawn: list) -> dict[int, torch.Tensor]:
        """The DPO jobs' reference: the log-probability of each of their sequences under the frozen
        base (rows routed to no adapter) or a job's frozen initial adapter (`Job.reference`), in a
        stream of their rows alone, laid out as the fused forward lays them. In eval mode: no
        dropout, so the reference is a fixed function."""
        dpo = [k for k, j in enumerate(jobs) if j.cfg.task == "dpo"]
        if not dpo:
            return {}
        stream = token_stream([drawn[k][0] for k in dpo])
        inputs = StreamInputs.of(stream, [drawn[k][1] for k in dpo], self.device, self.attn_implementation, self.model)
        self.model.eval()
        try:
            segments = [Segment(jobs[k].reference, a, b) for k, (a, b) in zip(dpo, stream.spans)]
            with self.am.route(segments, per_token=True), inputs.attention:
                hidden = self.decoder(input_ids=inputs.ids, position_ids=inputs.positions,
                                      use_cache=False).last_hidden_state
        finally:
            self.model.train()
        logps = inputs.sequence_logps(inputs.token_losses(self.head, hidden))
        out, start = {}, 0
        for i, k in enumerate(dpo):
            n = stream.owners.count(i)
            out[k], start = logps[start:start + n], start + n
        return out

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
    """Turn the records' device-tensor losses, grad norms and metrics into floats with one transfer."""
    records = list(records)
    fields = [(r, f) for r in records for f in ("loss", "grad_norm") if isinstance(getattr(r, f), torch.Tensor)]
    metrics = [(r, k) for r in records for k, v in r.metrics.items() if isinstance(v, torch.Tensor)]
    tensors = [getattr(r, f).float() for r, f in fields] + [r.metrics[k].float() for r, k in metrics]
    if tensors:
        values = torch.stack(tensors).tolist()
        for (r, f), v in zip(fields, values):
            setattr(r, f, v)
        for (r, k), v in zip(metrics, values[len(fields):]):
            r.metrics[k] = v
