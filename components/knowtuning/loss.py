"""KnowTuning's stage-2 objective: DPO plus ``gamma`` times the SFT loss on the chosen answer.

For a pair with policy log-probabilities ``pc, pr`` (summed over the answer tokens), reference
log-probabilities ``rc, rr``, and the policy's *mean* per-token log-probability ``mc`` of the
chosen answer::

    loss = -log sigmoid(beta * ((pc - rc) - (pr - rr))) + gamma * (-mc)

with torchtune's label smoothing on the DPO term when ``label_smoothing > 0``. This is the loss
KnowTuning trained with (LLaMA-Factory's DPO trainer with ``dpo_ftx``: its SFT term is the
negative *average* log-probability of the chosen answer's tokens); KnowTuning and the study used
``beta=0.1, gamma=0.2``. With ``gamma=0`` it is exactly torchtune's
:class:`~torchtune.rlhf.loss.DPOLoss`.
"""

from typing import Optional, Tuple

import torch
from torch import nn
from torchtune.rlhf.loss import DPOLoss


class DPOSFTLoss(nn.Module):
    """DPO (beta) + gamma x SFT on the chosen answer; see the module docstring.

    Args:
        beta (float): DPO temperature. Default 0.1 (KnowTuning).
        gamma (float): weight of the SFT term, the negative mean per-token log-probability of
            the chosen answer under the policy. Default 0.2 (KnowTuning's ``dpo_ftx``).
        label_smoothing (float): conservative-DPO label smoothing, as torchtune's. Default 0.

    The forward takes torchtune's four DPO inputs plus ``policy_chosen_mean_logps`` (shape
    ``(batch,)``) and returns ``(losses, chosen_rewards, rejected_rewards)`` per example, as
    :class:`~torchtune.rlhf.loss.DPOLoss` does; :attr:`last_terms` keeps the two parts of the last
    call (detached) for logging.
    """

    def __init__(self, beta: float = 0.1, gamma: float = 0.2, label_smoothing: float = 0.0):
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.beta = beta
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.dpo = DPOLoss(beta=beta, label_smoothing=label_smoothing)
        self.last_terms: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        reference_chosen_logps: torch.Tensor,
        reference_rejected_logps: torch.Tensor,
        policy_chosen_mean_logps: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dpo_losses, chosen_rewards, rejected_rewards = self.dpo(
            policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
        )
        if self.gamma == 0:
            sft_losses = torch.zeros_like(dpo_losses)
        elif policy_chosen_mean_logps is None:
            raise ValueError("DPOSFTLoss with gamma > 0 needs policy_chosen_mean_logps")
        else:
            sft_losses = -policy_chosen_mean_logps
        self.last_terms = (dpo_losses.detach(), sft_losses.detach())
        return dpo_losses + self.gamma * sft_losses, chosen_rewards, rejected_rewards
