"""Preference losses on sequence log-probabilities: DPO, CPO (and SimPO), ORPO.

Pure tensor functions of a batch of pairs (a chosen and a rejected answer to one prompt). Each takes
the policy's log-probabilities of each answer (summed over its tokens) and the answers' token counts,
DPO also the reference's, and returns every pair's loss and the metrics TRL logs under the same
names (`rewards/chosen`, `rewards/rejected`, `rewards/accuracies`, `rewards/margins`,
`logps/chosen`, `logps/rejected`, ...), as per-pair values to be averaged over the step.

The formulas follow TRL (DPOTrainer; CPOTrainer and ORPOTrainer of `trl.experimental`):
- DPO: `d = (π_c − ref_c) − (π_r − ref_r)` on summed log-probs; sigmoid `−(1−ε)·logσ(βd) − ε·logσ(−βd)`
  (ε = label_smoothing, the conservative DPO of Mitchell 2023; TRL's sigmoid is ε = 0), hinge
  `relu(1 − βd)`, IPO `(d̄ − 1/(2β))²` with d̄ on per-token averages.
- CPO: the same without a reference (`d = π_c − π_r`, on averages for ipo and simpo; simpo
  subtracts `γ/β`), plus `cpo_alpha` times the chosen answers' token-mean NLL (added by the caller).
- ORPO: `β·logσ(log odds)` on average log-probs, `log odds = (p̄_c − p̄_r) − (log(1−e^p̄_c) − log(1−e^p̄_r))`,
  subtracted from the chosen sequences' NLL (by the caller; as TRL's, over their prompts too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rayft.config import PREFERENCE_LOSS_TYPES as LOSS_TYPES


@dataclass
class PairLosses:
    losses: torch.Tensor  # (P,): each pair's preference loss (before any NLL term)
    metrics: dict[str, torch.Tensor]  # TRL's names -> (P,) per-pair values


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − e^x) for x < 0, stable at both ends."""
    return torch.where(x > -0.693, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _metrics(chosen_reward: torch.Tensor, rejected_reward: torch.Tensor, chosen: torch.Tensor,
             rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    c, r = chosen_reward.detach(), rejected_reward.detach()
    return {"rewards/chosen": c, "rewards/rejected": r, "rewards/accuracies": (c > r).float(),
            "rewards/margins": c - r, "logps/chosen": chosen.detach(), "logps/rejected": rejected.detach()}


def _margin_loss(margin: torch.Tensor, loss_type: str, beta: float, label_smoothing: float) -> torch.Tensor:
    """The pair loss of a margin (chosen's score minus rejected's): logistic (with label smoothing,
    the conservative form), hinge, or IPO's square."""
    if loss_type == "hinge":
        return torch.relu(1 - beta * margin)
    if loss_type == "ipo":
        return (margin - 1 / (2 * beta)) ** 2
    return -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)


def dpo(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
        chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor, loss_type: str = "sigmoid",
        beta: float = 0.1, label_smoothing: float = 0.0) -> PairLosses:
    if loss_type not in LOSS_TYPES["dpo"]:
        raise ValueError(f"dpo: unknown loss_type {loss_type!r} (use {', '.join(LOSS_TYPES['dpo'])})")
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if loss_type == "ipo":  # on per-token averages
        margin = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
    else:
        margin = chosen_ratio - rejected_ratio
    losses = _margin_loss(margin, loss_type, beta, label_smoothing)
    return PairLosses(losses, _metrics(beta * chosen_ratio, beta * rejected_ratio, chosen, rejected))


def cpo(chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
        loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5) -> PairLosses:
    if loss_type not in LOSS_TYPES["cpo"]:
        raise ValueError(f"cpo: unknown loss_type {loss_type!r} (use {', '.join(LOSS_TYPES['cpo'])})")
    if loss_type in ("ipo", "simpo"):  # length-normalised
        chosen, rejected = chosen / chosen_tokens.clamp(min=1), rejected / rejected_tokens.clamp(min=1)
    margin = chosen - rejected
    if loss_type == "simpo":  # the logistic loss with a target margin
        margin = margin - simpo_gamma / beta
    losses = _margin_loss(margin, "sigmoid" if loss_type == "simpo" else loss_type, beta, label_smoothing)
    return PairLosses(losses, _metrics(beta * chosen, beta * rejected, chosen, rejected))


def orpo(chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
         beta: float = 0.1) -> PairLosses:
    """The odds-ratio term per pair, as a loss (`−β·logσ(log odds)`); the caller adds the NLL."""
    chosen, rejected = (chosen / chosen_tokens.clamp(min=1)).float(), (rejected / rejected_tokens.clamp(min=1)).float()
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    metrics = _metrics(beta * chosen, beta * rejected, chosen, rejected)
    metrics.update({"log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()})
    return PairLosses(-beta * ratio, metrics)


def pair_losses(cfg, chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor,
                rejected_tokens: torch.Tensor, reference: torch.Tensor | None = None) -> PairLosses:
    """A job's (`JobConfig`) pair losses; `reference`: the reference's log-probabilities of its
    sequences, chosen and rejected interleaved as the pairs are (DPO only)."""
    p = cfg.preference
    if cfg.task == "dpo":
        if reference is None:
            raise ValueError(f"job {cfg.name}: dpo needs the reference's log-probabilities")
        return dpo(chosen, rejected, reference[0::2], reference[1::2], chosen_tokens, rejected_tokens, p.loss_type,
                   p.beta, p.label_smoothing)
    if cfg.task == "cpo":
        return cpo(chosen, rejected, chosen_tokens, rejected_tokens, p.loss_type, p.beta, p.label_smoothing,
                   p.simpo_gamma)
    if cfg.task == "orpo":
        return orpo(chosen, rejected, chosen_tokens, rejected_tokens, p.beta)
    raise ValueError(f"job {cfg.name}: task {cfg.task!r} is not a preference task")
