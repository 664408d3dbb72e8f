"""SAPO: soft adaptive policy optimization (Qwen 2025, arXiv 2511.20347).

l_t = -f(r_t) * A_t with the soft gate f(r) = sigmoid(tau (r - 1)) * 4 / tau, tau = tau_pos if A > 0 else tau_neg.
f(1) = 2/tau and f'(1) = 1: on-policy it is the plain policy gradient; far from 1 the gradient fades smoothly
instead of being cut at a clip boundary.
"""

import torch

from po_registry import hookimpl
from po_registry.ops import aggregate


class SAPO:
    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective

        register(
            "sapo",
            components=["sapo"],
            summary="SAPO: a smooth sigmoid gate on the ratio instead of a hard clip",
            targets="hard clipping zeroes gradients abruptly and discards informative off-policy tokens",
            paper="arXiv 2511.20347",
            objective=Objective(aggregation="length"),  # f'(1) = 1: the policy gradient, sequence-mean aggregated
            fixes=("clip-saturation",),
        )

    @hookimpl
    def po_declare_options(self, register):
        register("sapo_tau_pos", 1.0, type=float, check=lambda v: v > 0, help="gate temperature for A > 0, > 0")
        register("sapo_tau_neg", 1.05, type=float, check=lambda v: v > 0, help="gate temperature for A <= 0, > 0")

    @hookimpl
    def po_policy_objective(self, batch, log_weights):
        tau = torch.where(batch.advantages > 0, batch.options["sapo_tau_pos"], batch.options["sapo_tau_neg"])
        gate = torch.sigmoid(tau * (torch.exp(log_weights) - 1)) * 4 / tau
        batch.log_metric("sapo/gate_mean", batch.global_masked_mean(gate.detach()))
        return -gate * batch.advantages

    @hookimpl
    def po_aggregate_loss(self, per_token_loss, batch):
        return aggregate(per_token_loss, batch.mask, "seq-mean-token-mean")
