"""Each job's own optimizer and learning-rate schedule, built from its OptimizerConfig."""

from __future__ import annotations

import math

import torch

from rayft.config import OptimizerConfig


def build_optimizer(param_groups: list[dict], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """Fused on every device: one kernel for all of a job's tensors (launches dominate small adapters
    on a GPU), and the only implementation that takes `found_inf`, which skips a non-finite step on
    the device without a host sync (Job.after_micro_batch)."""
    if cfg.name == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               fused=True)
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=True)


def lr_factor(step: int, total_steps: int, cfg: OptimizerConfig) -> float:
    """Multiplier of the base lr after `step` optimizer steps: linear warm-up, then the schedule."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_schedule(optimizer, total_steps: int, cfg: OptimizerConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))


def named_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state keyed by parameter name (its groups' `param_names`), not by position:
    a process holding another subset of the same parameters (a pipeline stage) can load it, and the
    states of several such processes join by a union."""
    sd = optimizer.state_dict()
    state = {}
    for live, saved in zip(optimizer.param_groups, sd["param_groups"]):
        for name, index in zip(live["param_names"], saved["params"]):
            if index in sd["state"]:
                state[name] = sd["state"][index]
    hyper = [{k: v for k, v in g.items() if k not in ("params", "param_names")} for g in sd["param_groups"]]
    return {"param_groups": hyper, "state": state}


def load_named_optimizer_state(optimizer: torch.optim.Optimizer, named: dict) -> None:
    """Load `named_optimizer_state`'s output; names this optimizer does not hold are left out."""
    sd = optimizer.state_dict()
    if len(named["param_groups"]) != len(sd["param_groups"]):
        raise ValueError(f"optimizer state has {len(named['param_groups'])} parameter groups, this job has "
                         f"{len(sd['param_groups'])} (LoRA+ on one side only?)")
    state = {}
    for live, saved in zip(optimizer.param_groups, sd["param_groups"]):
        for name, index in zip(live["param_names"], saved["params"]):
            if name in named["state"]:
                state[index] = named["state"][name]
    groups = [{**saved, **hyper} for saved, hyper in zip(sd["param_groups"], named["param_groups"])]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
