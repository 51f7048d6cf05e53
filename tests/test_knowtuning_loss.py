"""KnowTuning's stage-2 loss, DPO + gamma x SFT, against a hand computation and torchtune's DPOLoss."""

import math

import pytest
import torch
from torchtune.rlhf import get_batch_log_probs
from torchtune.rlhf.loss import DPOLoss

from components.knowtuning import DPOSFTLoss
from components.knowtuning.scoring import token_log_probs

# fixed log-probabilities of three pairs: policy chosen/rejected (sums), reference, and the
# policy's mean per-token log-probability of each chosen answer
PC = torch.tensor([-10.0, -25.0, -7.5])
PR = torch.tensor([-12.0, -20.0, -7.0])
RC = torch.tensor([-11.0, -24.0, -8.0])
RR = torch.tensor([-11.5, -21.0, -7.25])
MC = torch.tensor([-1.25, -2.5, -0.75])


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_loss_equals_a_hand_computation():
    beta, gamma = 0.1, 0.2
    losses, chosen_rewards, rejected_rewards = DPOSFTLoss(beta=beta, gamma=gamma)(PC, PR, RC, RR, MC)
    # pair 0: logits = (-10 - -12) - (-11 - -11.5) = 2 - 0.5 = 1.5
    # pair 1: (-25 - -20) - (-24 - -21) = -5 - -3 = -2
    # pair 2: (-7.5 - -7) - (-8 - -7.25) = -0.5 - -0.75 = 0.25
    logits = [1.5, -2.0, 0.25]
    sft = [1.25, 2.5, 0.75]
    expected = [-_log_sigmoid(beta * z) + gamma * s for z, s in zip(logits, sft)]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    # e.g. pair 0 written out: -log(sigmoid(0.15)) + 0.2 * 1.25
    assert losses[0].item() == pytest.approx(math.log1p(math.exp(-0.15)) + 0.25, abs=1e-6)
    assert chosen_rewards.tolist() == pytest.approx([0.1, -0.1, 0.05], abs=1e-6)
    assert rejected_rewards.tolist() == pytest.approx([-0.05, 0.1, 0.025], abs=1e-6)


def test_gamma_zero_is_torchtunes_dpo_loss():
    ours = DPOSFTLoss(beta=0.1, gamma=0.0)(PC, PR, RC, RR, MC)
    theirs = DPOLoss(beta=0.1)(PC, PR, RC, RR)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # and without the SFT input at all
    torch.testing.assert_close(DPOSFTLoss(gamma=0.0)(PC, PR, RC, RR)[0], theirs[0], rtol=0, atol=0)
    # label smoothing goes to torchtune's DPO term unchanged
    ours = DPOSFTLoss(beta=0.3, gamma=0.0, label_smoothing=0.1)(PC, PR, RC, RR)
    theirs = DPOLoss(beta=0.3, label_smoothing=0.1)(PC, PR, RC, RR)
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0)


def test_sft_term_needs_the_chosen_mean_log_probs():
    with pytest.raises(ValueError, match="policy_chosen_mean_logps"):
        DPOSFTLoss(gamma=0.2)(PC, PR, RC, RR)
    with pytest.raises(ValueError, match="gamma"):
        DPOSFTLoss(gamma=-1.0)


def test_terms_are_kept_for_logging_and_gradients_reach_the_sft_input():
    loss_fn = DPOSFTLoss(beta=0.1, gamma=0.2)
    mc = MC.clone().requires_grad_()
    losses, _, _ = loss_fn(PC, PR, RC, RR, mc)
    dpo, sft = loss_fn.last_terms
    torch.testing.assert_close(losses.detach(), dpo + 0.2 * sft)
    losses.mean().backward()
    torch.testing.assert_close(mc.grad, torch.full((3,), -0.2 / 3))


def test_token_log_probs_match_torchtunes_batch_log_probs():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[:, :2] = -100  # a masked prompt
    labels[1, 5:] = -100  # padding
    sums, counts = token_log_probs(logits, labels)
    torch.testing.assert_close(sums, get_batch_log_probs(logits, labels))
    torch.testing.assert_close(sums / counts, get_batch_log_probs(logits, labels, return_average_logprobs=True))
