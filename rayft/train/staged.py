"""The fused step on one pipeline stage of a staged replica.

A staged replica is S processes, one per stage (`rayft.model.stages`), in one torch.distributed
process group (gloo on CPUs, NCCL on GPUs). Every stage holds every job of the replica: its data
(packers are deterministic, so all stages draw the same micro-batches without sending any), its
optimizer and schedule over the adapter weights of this stage's layers.

`StageEngine.run` takes several optimizer steps of every job as one pipeline: each job's
micro-batches (its own rows, one per accumulation micro-step), step by step and job by job, in the
slot order of `rayft.scheduler.pipeline.pipeline_slots`, flow through the stages in 1F1B order, so
while a stage works on job B, job A's activations travel, and the pipeline drains only at the end
of the call. Activations go forward and their gradients back by point-to-point messages (sends
never block; a receive waits). When a stage has run the backward of a job's last micro-batch of an
accumulation window, it starts an all-reduce of the job's (gradient sum of squares, loss) over the
stages, in the background on a group of its own; before that job's next forward it waits for it,
clips by the job's whole gradient norm, checks finiteness by it and steps its shard, exactly as
one process holding every layer would (only the last stage has the head, so the loss comes from it).

Checkpoints and adapters: every stage hands its shard (weights, optimizer state by parameter
name, dropout streams by layer) to the first, which writes one ordinary checkpoint or PEFT adapter;
its outcome is broadcast so a failed write fails the job on every stage alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from rayft.adapters import AdapterError, AdapterModel, Segment
from rayft.adapters.peft_format import write_adapter
from rayft.data import token_stream
from rayft.model.stages import StageModel, StageSpec
from rayft.scheduler.pipeline import pipeline_slots, slot_orders
from rayft.train.checkpoint import write_checkpoint
from rayft.train.engine import FusedStepStats, StreamInputs, read_back
from rayft.train.job import Job


class StageLinks:
    """A stage's messages to its neighbours and the replica group's collectives (torch.distributed,
    initialised by the caller: the stage's rank is its index)."""

    def __init__(self, spec: StageSpec, device: torch.device | str, group=None):
        self.spec, self.device, self.group = spec, torch.device(device), group
        self._sends: list = []  # (work, tensor) of sends in flight; the tensor must outlive the work
        self.wait_seconds = 0.0  # time spent in receives: this stage's share of the bubble
        # the gradient-norm reductions run in the background beside the activations' messages: on
        # a group of their own (made here, while every stage makes it at the same point)
        self._reduce_group = dist.new_group(backend="gloo" if self.device.type == "cpu" else None) \
            if dist.is_initialized() else None

    def send(self, tensor: torch.Tensor, to: int) -> None:
        tensor = tensor.contiguous()
        self._sends.append((dist.isend(tensor, to, group=self.group), tensor))

    def recv(self, shape, dtype: torch.dtype, src: int) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        t0 = time.perf_counter()
        dist.recv(buf, src, group=self.group)
        self.wait_seconds += time.perf_counter() - t0
        return buf

    def flush(self) -> None:
        for work, _ in self._sends:
            work.wait()
        self._sends = []

    def all_reduce_async(self, tensor: torch.Tensor):
        """Sum `tensor` over the stages in place, in the background; returns the work to wait on.
        On a group of its own, apart from the activations' messages."""
        return dist.all_reduce(tensor, group=self._reduce_group, async_op=True)

    def gather_to_first(self, obj) -> list | None:
        out = [None] * self.spec.count if self.spec.first else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def broadcast_from_first(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


@dataclass(frozen=True)
class Stage:
    """Where a trainer runs when it is one stage of a staged replica."""

    spec: StageSpec
    links: StageLinks


class StageEngine:
    def __init__(self, part: StageModel, am: AdapterModel, device: torch.device | str, links: StageLinks,
                 attn_implementation: str = "sdpa"):
        self.part, self.am, self.model = part, am, part.model
        self.spec, self.links = part.spec, links
        self.device = torch.device(device)
        self.attn_implementation = getattr(self.model.config, "_attn_implementation", None) or attn_implementation
        self.hidden_size = self.model.config.hidden_size
        self.dtype = next(self.model.parameters()).dtype

    def run(self, jobs: list[Job], steps: int) -> list[FusedStepStats]:
        """`steps` optimizer steps of every job given, in one pipeline that drains only at the end;
        one FusedStepStats per step (the call's time split evenly). The caller makes sure no job
        ends or is due a checkpoint before the last of them (`steps_until_saved`)."""
        t0 = time.perf_counter()
        self.model.train()
        jobs = sorted((j for j in jobs if not j.done), key=lambda j: j.name)  # the same order on every stage
        slots = self._plan(jobs, steps)
        records: list[dict] = [{} for _ in range(steps)]
        tokens = [0] * steps
        pad_slots = 0
        saved: dict[int, tuple] = {}
        pending: dict[str, tuple] = {}  # job -> (its gradient-norm all-reduce in flight, its step index)
        me = self.spec.index
        for op, m in slot_orders(slots, self.spec.count)[me] if slots else []:
            job, batch, window, t = slots[m]
            if op == "F":
                if job.name in pending:  # its previous window's update, before this forward reads the weights
                    self._finish(job, pending.pop(job.name), records)
                stream = token_stream([batch])
                n = stream.num_tokens
                inputs = StreamInputs.of(stream, [window], self.device, self.attn_implementation, self.model,
                                         [job.cfg] if self.spec.last else None)
                received = None
                if not self.spec.first:
                    received = self.links.recv((1, n, self.hidden_size), self.dtype, me - 1).requires_grad_(True)
                with self.am.route([Segment(job.adapter.name, 0, n)], per_token=True), inputs.attention:
                    out = self.part.forward(inputs.ids, inputs.positions, received)
                if self.spec.last:
                    per_job, total, metrics = inputs.losses(self.part.head, out, 1)
                    saved[m] = (total, received, per_job.detach()[0], n, metrics.get(0))
                else:
                    self.links.send(out.detach(), me + 1)
                    saved[m] = (out, received, 0.0, n, None)
                tokens[t] += n
                pad_slots += 0 if inputs.layout is None else inputs.layout.padded_slots
            else:
                out, received, loss, n, metrics = saved.pop(m)
                if self.spec.last:
                    out.backward()
                else:
                    out.backward(self.links.recv(out.shape, out.dtype, me + 1))
                if not self.spec.first:
                    self.links.send(received.grad, me - 1)
                if job.count_micro_batch(loss, n, 0, metrics):  # the window's last: its norm and loss, from all stages
                    share = torch.stack([job.grad_sq().float(),
                                         torch.as_tensor(job.window_loss, device=self.device, dtype=torch.float32)])
                    pending[job.name] = (self.links.all_reduce_async(share), share, t)
        for name in list(pending):  # issued in the same order on every stage
            self._finish(next(j for j in jobs if j.name == name), pending.pop(name), records)
        self.links.flush()
        for r in records:
            read_back(r.values())
        seconds = (time.perf_counter() - t0) / max(1, steps)
        return [FusedStepStats(seconds, tokens[t], 0, records[t], pad_slots if t == steps - 1 else 0)
                for t in range(steps)]

    def _plan(self, jobs: list[Job], steps: int) -> list[tuple | None]:
        """Every micro-batch of the call, drawn, in `pipeline_slots` order; None for an idle slot."""
        windows = [j.cfg.optimizer.grad_accumulation - j.micro for j in jobs]
        slots = []
        for slot in pipeline_slots(windows, steps, self.spec.count):
            if slot is None:
                slots.append(None)
            else:
                job, t = jobs[slot[0]], slot[1]
                slots.append((job, *job.next_micro_batch(), t))
        return slots

    def _finish(self, job: Job, pending: tuple, records: list[dict]) -> None:
        work, share, t = pending
        t0 = time.perf_counter()
        work.wait()
        self.links.wait_seconds += time.perf_counter() - t0
        records[t][job.name] = job.optimizer_step(share[0].sqrt(), share[1])

    # ---- one checkpoint, one adapter, from every stage's shard ------------------------------------

    def _shard(self, job: Job, with_state: bool) -> dict:
        name = job.adapter.name
        layers = {n: layer.fan_in_fan_out for n, layer in self.am.layers().items() if name in layer.adapters}
        proj = self.am.vera_projections.get(name)
        return {"weights": {k: v.contiguous().cpu() for k, v in self.am.adapter_state(name).items()},
                "layers": layers, "state": job.state_dict() if with_state else None,
                "vera": None if proj is None else (proj.A.cpu(), proj.B.cpu())}

    def _written_by_first(self, job: Job, with_state: bool, write) -> Path:
        """Gather every stage's shard of `job` on the first stage, which calls `write(weights, layers,
        state, vera)`; returns its path on every stage, or raises its error on every stage."""
        shards = self.links.gather_to_first(self._shard(job, with_state))
        outcome = None
        if shards is not None:
            weights, layers = {}, {}
            for s in shards:  # stage order: the whole model's layer order
                weights.update(s["weights"])
                layers.update(s["layers"])
            state = merged_state([s["state"] for s in shards]) if with_state else None
            try:
                outcome = ("ok", str(write(weights, layers, state, shards[0]["vera"])))
            except (OSError, AdapterError) as e:
                outcome = (type(e).__name__, str(e))
        kind, value = self.links.broadcast_from_first(outcome)
        if kind == "ok":
            return Path(value)
        raise (AdapterError if kind == "AdapterError" else OSError)(value)

    def save_checkpoint(self, job: Job, root: Path) -> Path:
        return self._written_by_first(job, True, lambda weights, layers, state, vera: write_checkpoint(
            root, job.name, job.step, weights, state))

    def save_adapter(self, job: Job, out_dir: Path, base_model: str | None) -> Path:
        return self._written_by_first(job, False, lambda weights, layers, state, vera: write_adapter(
            self.am.configs[job.adapter.name], weights, layers, out_dir, base_model, vera))


def merged_state(states: list[dict]) -> dict:
    """One `Job.state_dict` from every stage's: the same counters, schedule and data cursor, the
    optimizer state and dropout streams of all their parameters and layers."""
    merged = dict(states[0])
    merged["optimizer"] = {"param_groups": states[0]["optimizer"]["param_groups"],
                           "state": {k: v for s in states for k, v in s["optimizer"]["state"].items()}}
    merged["dropout_rng"] = {k: v for s in states for k, v in s["dropout_rng"].items()}
    return merged
