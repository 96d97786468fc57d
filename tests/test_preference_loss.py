"""The preference losses equal TRL's trainers' own loss code on the same tensors: DPOTrainer's
`_compute_loss` (fed per-token log-probs by stand-in policy and reference models), CPOTrainer's
`cpo_loss` and ORPOTrainer's `odds_ratio_loss` (trl.experimental), over generated batches."""

import random
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from rayft.train import preference

trl = pytest.importorskip("trl")


def draw(rng: random.Random, pairs: int, seq: int = 9):
    """Per-token log-probs of a policy and a reference on `pairs` chosen rows then as many rejected,
    with completion masks (the answer's tokens) of random lengths."""
    g = torch.Generator().manual_seed(rng.randint(0, 10**6))
    policy = -torch.rand(2 * pairs, seq, generator=g, dtype=torch.float64) * 3
    ref = policy + torch.randn(2 * pairs, seq, generator=g, dtype=torch.float64) * 0.3
    mask = torch.zeros(2 * pairs, seq + 1, dtype=torch.long)
    for i in range(2 * pairs):
        start = rng.randint(1, seq - 1)
        mask[i, start:rng.randint(start + 1, seq + 1)] = 1
    return policy, ref, mask


class _Out(SimpleNamespace):
    pass


class _Model(torch.nn.Module):
    """Stands in for a model called with `fused_lm_head=True`: returns the given per-token log-probs."""

    def __init__(self, logps):
        super().__init__()
        self.logps, self.is_gradient_checkpointing = logps, False

    def forward(self, **kwargs):
        n = self.logps
        return _Out(log_probs=n, entropy=torch.zeros_like(n), mean_logits=torch.zeros_like(n),
                    is_top1=torch.zeros_like(n, dtype=torch.bool))


def trl_dpo(policy, ref, mask, loss_type, beta, label_smoothing):
    from trl.trainer.dpo_trainer import DPOTrainer

    shift = mask[:, 1:]
    acc = SimpleNamespace(device="cpu", gather_for_metrics=lambda t: t, gather=lambda t: t,
                          unwrap_model=lambda m: m)
    me = SimpleNamespace(
        model=_Model(policy * shift), ref_model=_Model(ref * shift), accelerator=acc, aux_loss_enabled=False,
        ld_alpha=None, precompute_ref_logps=False, args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=label_smoothing, use_weighting=False, _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask}
    loss = DPOTrainer._compute_loss(me, me.model, inputs, False)
    return loss, {k: v[-1] for k, v in me._metrics["train"].items()}


def sums(logps, mask):
    shift = mask[:, 1:]
    total, tokens = (logps * shift).sum(1), shift.sum(1)
    p = logps.shape[0] // 2
    return total[:p], total[p:], tokens[:p], tokens[p:]


@pytest.mark.parametrize("seed", range(12))
def test_dpo_equals_trl_dpo_trainer(seed):
    rng = random.Random(seed)
    loss_type = ["sigmoid", "hinge", "ipo"][seed % 3]
    beta = rng.choice([0.05, 0.1, 0.5])
    policy, ref, mask = draw(rng, rng.randint(1, 4))
    want, metrics = trl_dpo(policy, ref, mask, loss_type, beta, 0.0)
    c, r, ct, rt = sums(policy, mask)
    rc, rr, _, _ = sums(ref, mask)
    got = preference.dpo(c, r, rc, rr, ct, rt, loss_type, beta)
    torch.testing.assert_close(got.losses.mean(), want)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected"):
        assert float(got.metrics[name].mean()) == pytest.approx(metrics[name], rel=1e-9, abs=1e-12), name


def test_dpo_label_smoothing_is_the_conservative_dpo():
    """TRL's sigmoid loss has no smoothing; ε > 0 gives cDPO's mixture of the two labels."""
    c, r, rc, rr = (torch.tensor([v]) for v in (-3.0, -5.0, -4.0, -4.5))
    one = torch.tensor([4.0])
    plain = preference.dpo(c, r, rc, rr, one, one, "sigmoid", 0.2).losses
    flipped = preference.dpo(r, c, rr, rc, one, one, "sigmoid", 0.2).losses
    smooth = preference.dpo(c, r, rc, rr, one, one, "sigmoid", 0.2, label_smoothing=0.1).losses
    torch.testing.assert_close(smooth, 0.9 * plain + 0.1 * flipped)


@pytest.mark.parametrize("seed", range(16))
def test_cpo_and_simpo_equal_trl_cpo_loss(seed):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    rng = random.Random(100 + seed)
    loss_type = ["sigmoid", "hinge", "ipo", "simpo"][seed % 4]
    beta, ls, gamma = rng.choice([0.1, 0.5, 2.0]), rng.choice([0.0, 0.0, 0.2]), rng.choice([0.5, 1.0])
    if loss_type in ("hinge", "ipo"):
        ls = 0.0
    policy, _, mask = draw(rng, rng.randint(1, 4))
    c, r, ct, rt = sums(policy, mask)
    avg = loss_type in ("ipo", "simpo")  # CPOTrainer hands cpo_loss averages for these
    me = SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=ls, simpo_gamma=gamma,
                         accelerator=SimpleNamespace(device="cpu"))
    want, want_c, want_r = CPOTrainer.cpo_loss(me, c / ct if avg else c, r / rt if avg else r)
    got = preference.cpo(c, r, ct, rt, loss_type, beta, ls, gamma)
    torch.testing.assert_close(got.losses, want)
    torch.testing.assert_close(got.metrics["rewards/chosen"], want_c)
    torch.testing.assert_close(got.metrics["rewards/rejected"], want_r)


@pytest.mark.parametrize("seed", range(8))
def test_orpo_equals_trl_odds_ratio_loss(seed):
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    rng = random.Random(200 + seed)
    beta = rng.choice([0.1, 0.25, 1.0])
    policy, _, mask = draw(rng, rng.randint(1, 4))
    if seed % 2:
        policy = policy / 40  # average log-probs near 0, where log(1 − e^x) needs care
    c, r, ct, rt = sums(policy, mask)
    me = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device="cpu"))
    ratio, want_c, want_r, mean_ratio, mean_odds = ORPOTrainer.odds_ratio_loss(me, c / ct, r / rt)
    got = preference.orpo(c, r, ct, rt, beta)
    torch.testing.assert_close(got.losses, -ratio)  # TRL's loss subtracts its mean from the NLL
    torch.testing.assert_close(got.metrics["rewards/chosen"], want_c)
    torch.testing.assert_close(got.metrics["log_odds_ratio"].mean(), mean_ratio)
    torch.testing.assert_close(got.metrics["log_odds_chosen"].mean(), mean_odds)
