"""One adapter job on a replica: its data stream, optimizer, schedule and counters.

Everything that decides a job's future (weights, optimizer and schedule state, the packer cursor,
the dropout RNG, the step counters) is in `state_dict`, so a checkpoint restores it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from rayft.adapters import AdapterModel, load_adapter
from rayft.config import AdapterConfig, JobConfig
from rayft.data import PackedBatch, Packer, job_steps
from rayft.train.optim import build_optimizer, build_schedule, load_named_optimizer_state, named_optimizer_state


@dataclass
class StepRecord:
    step: int  # optimizer steps done after this record
    loss: float | torch.Tensor  # token-mean cross entropy over the whole step (a tensor until the engine syncs)
    lr: float
    grad_norm: float | torch.Tensor | None
    tokens: int  # real tokens in the step
    padding: float  # padding fraction of this job's rows in the step
    metrics: dict = field(default_factory=dict)  # a preference job's, by TRL's names (window means)
    eval_loss: float | None = None  # its held-out loss after this step, where measured (eval.loss_every)

    @property
    def finite(self) -> bool:
        """False when the loss or the gradient norm is NaN or infinite (the step was then skipped)."""
        return all(v is None or math.isfinite(v) for v in (self.loss, self.grad_norm))


def reference_adapter(name: str) -> str:
    """The name of a DPO job's frozen initial adapter (':' keeps it apart from every job's name)."""
    return f"{name}:reference"


@dataclass(frozen=True)
class Window:
    """What a job's loss is averaged over: its whole accumulation window."""

    loss_tokens: int  # loss tokens (an SFT job's token mean)
    pairs: int = 0  # preference pairs (a preference job's pair mean)
    # what the chosen side's NLL is averaged over: CPO's, the chosen answers' loss tokens; ORPO's
    # (as TRL's ORPOTrainer), every token the chosen sequences predict, their prompts' included
    chosen_tokens: int = 0

    @classmethod
    def of(cls, batches: list[PackedBatch], task: str) -> Window:
        tokens = sum(b.num_loss_tokens for b in batches)
        if task == "sft":
            return cls(tokens)
        chosen = sum(b.num_chosen_predicted if task == "orpo" else b.num_chosen_loss_tokens for b in batches)
        return cls(tokens, sum(b.num_sequences for b in batches) // 2, chosen)


@dataclass
class Job:
    cfg: JobConfig
    adapter: AdapterConfig
    am: AdapterModel
    packer: Packer
    total_steps: int
    step: int = 0  # optimizer steps done
    micro: int = 0  # micro-batches into the current accumulation
    history: list[StepRecord] = field(default_factory=list)
    _loss_sum: float | torch.Tensor = 0.0
    _tokens: int = 0
    _pad: int = 0
    _window: list = field(default_factory=list)  # micro-batches of this accumulation not yet run
    _window_size: Window = Window(0)
    _metric_sums: dict = field(default_factory=dict)

    @classmethod
    def create(cls, cfg: JobConfig, adapter: AdapterConfig, am: AdapterModel, packer: Packer):
        """The job, its adapter added to the model (fresh or from init_from), ready to train on `packer`
        (rayft.data.job_packer)."""
        if adapter.init_from is not None:
            load_adapter(am, adapter.init_from, adapter.name, config=adapter, seed=cfg.seed)
        else:
            am.add_adapter(adapter, seed=cfg.seed)
        am.set_trainable(adapter.name, True)
        if cfg.task == "dpo" and adapter.init_from is not None:
            # as TRL: a DPO job that starts from an adapter measures itself against that adapter, frozen
            ref = reference_adapter(adapter.name)
            try:
                load_adapter(am, adapter.init_from, ref, config=adapter.model_copy(update={"name": ref}),
                             seed=cfg.seed)
            except Exception:
                am.remove_adapter(adapter.name)
                raise
            am.set_trainable(ref, False)
        job = cls(cfg, adapter, am, packer, job_steps(cfg, packer))
        opt = cfg.optimizer
        job.optimizer = build_optimizer(
            am.param_groups(adapter.name, opt.lr, opt.weight_decay, opt.loraplus_lr_ratio), opt
        )
        job.schedule = build_schedule(job.optimizer, job.total_steps, opt)
        return job

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        if not hasattr(self, "_parameters"):  # walking the model's modules each step is not free
            self._parameters = list(self.am.adapter_parameters(self.adapter.name).values())
        return self._parameters

    @property
    def preference(self) -> bool:
        return self.cfg.task != "sft"

    def remove_adapters(self) -> None:
        """Take this job's adapter (and its frozen reference) off the model."""
        if self.reference is not None:
            self.am.remove_adapter(self.reference)
        self.am.remove_adapter(self.adapter.name)

    @property
    def reference(self) -> str | None:
        """The adapter DPO's reference runs with: its frozen initial adapter, or none (the base)."""
        name = reference_adapter(self.adapter.name)
        return name if name in self.am.configs else None

    def next_micro_batch(self) -> tuple[PackedBatch, Window]:
        """The next micro-batch and the size of its whole accumulation window.

        The loss is summed over tokens (pairs) and divided by the window's count, so accumulating N
        micro-batches gives the same gradient as one batch N times larger (the fix HF Trainer made
        in 4.46)."""
        if not self._window:
            self._window = [self.packer.next_batch() for _ in range(self.cfg.optimizer.grad_accumulation)]
            self._window_size = Window.of(self._window, self.cfg.task)
        return self._window.pop(0), self._window_size

    def after_micro_batch(self, loss: torch.Tensor, tokens: int, pad: int,
                          metrics: dict | None = None) -> StepRecord | None:
        """Count one micro-batch; on the last of an accumulation, clip and step. Returns the step's
        record, whose loss and grad norm stay device tensors until the engine reads them in one sync."""
        if not self.count_micro_batch(loss, tokens, pad, metrics):
            return None
        return self.optimizer_step(self.grad_norm())

    def count_micro_batch(self, loss: torch.Tensor | float, tokens: int, pad: int, metrics: dict | None = None) -> bool:
        """Count one micro-batch of the accumulation; True when it was the window's last. `metrics`
        are this micro-batch's shares of the window's means."""
        self.micro += 1
        for k, v in (metrics or {}).items():
            self._metric_sums[k] = self._metric_sums.get(k, 0.0) + v
        self._loss_sum += loss
        self._tokens += tokens
        self._pad += pad
        return self.micro >= self.cfg.optimizer.grad_accumulation

    @property
    def window_loss(self) -> torch.Tensor | float:
        """The loss counted so far in this accumulation window."""
        return self._loss_sum

    def grad_sq(self) -> torch.Tensor:
        """The sum of squares of this job's gradients held here (a stage's share of the norm)."""
        grads = [p.grad for p in self.parameters if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.parameters[0].device if self.parameters else None)
        return torch.stack([g.float().pow(2).sum() for g in grads]).sum()

    def grad_norm(self) -> torch.Tensor:
        return torch.nn.utils.get_total_norm([p.grad for p in self.parameters if p.grad is not None])

    def optimizer_step(self, norm: torch.Tensor, loss: torch.Tensor | float | None = None) -> StepRecord:
        """Clip to max_grad_norm by `norm` (the job's whole gradient norm, which on a pipeline stage
        spans every stage), step, and start the next accumulation. `loss` replaces the summed loss
        counted here (a stage without the output head counts none).

        A step whose loss or gradients are not finite is skipped on the device, as AMP's GradScaler
        skips one: the fused optimizer gets `found_inf` and leaves weights and state untouched. So
        no host sync here; the engine's read-back shows the record non-finite and the job is stopped."""
        if loss is not None:
            self._loss_sum = loss
        opt = self.cfg.optimizer
        if opt.max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(self.parameters, opt.max_grad_norm, norm)
        finite = torch.isfinite(norm) & torch.isfinite(torch.as_tensor(self._loss_sum, device=norm.device))
        self.optimizer.found_inf = (~finite).float()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        rec = StepRecord(
            self.step, self._loss_sum, lr, norm, self._tokens,
            self._pad / max(1, self._tokens + self._pad), self._metric_sums,
        )
        self.history.append(rec)
        self.micro, self._loss_sum, self._tokens, self._pad, self._metric_sums = 0, 0.0, 0, 0, {}
        return rec

    # ---- undoing a step that failed (out of memory) -------------------------------------------------

    def snapshot(self) -> dict:
        """What a fused step changes before this job's optimizer step: enough to undo it (`rollback`)."""
        return {"step": self.step, "packer": self.packer.state_dict(), "window": list(self._window),
                "window_size": self._window_size,
                "rng": self.am.router.generators[self.adapter.name].get_state()}

    def rollback(self, snap: dict) -> bool:
        """Put the job back where `snap` was taken, unless it completed its optimizer step since
        (then there is nothing to undo). Returns whether it rolled back."""
        if self.step != snap["step"]:
            return False
        self.packer.load_state_dict(snap["packer"])
        self._window, self._window_size = list(snap["window"]), snap["window_size"]
        self.am.router.generators[self.adapter.name].set_state(snap["rng"])
        self.optimizer.zero_grad(set_to_none=True)
        self.micro, self._loss_sum, self._tokens, self._pad, self._metric_sums = 0, 0.0, 0, 0, {}
        return True

    # ---- exact resume --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        if self.micro:
            raise RuntimeError(f"job {self.name}: checkpoint only between optimizer steps")
        return {
            "job": self.name,
            "step": self.step,
            "total_steps": self.total_steps,
            "optimizer": named_optimizer_state(self.optimizer),
            "schedule": self.schedule.state_dict(),
            "packer": self.packer.state_dict(),
            "dropout_rng": self.am.router.generators[self.adapter.name].get_state(),
            "history": [vars(r) for r in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.total_steps = state["step"], state["total_steps"]
        load_named_optimizer_state(self.optimizer, state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.packer.load_state_dict(state["packer"])
        self.am.router.generators[self.adapter.name].set_state(state["dropout_rng"])
        self.history = [StepRecord(**r) for r in state["history"]]
