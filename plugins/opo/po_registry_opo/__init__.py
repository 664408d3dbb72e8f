"""OPO: on-policy RL with the optimal reward baseline (Hao et al. 2025, arXiv 2505.23585).

With the sequence-level policy gradient, the variance-minimising baseline weights each sample by the squared
norm of its score function, which grows with its length: b = sum_j |o_j| R_j / sum_j |o_j| over the group, and
A_i = R_i - b. Unscorable completions are left out of b and get advantage 0.
"""

import torch

from po_registry import hookimpl


class OPO:
    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective, Rule

        register("opo", components=["opo"], paper="arXiv 2505.23585",
                 summary="OPO: length-weighted optimal baseline b = sum |o| R / sum |o| per group",
                 targets="gradient variance: the plain group mean is not the variance-minimising baseline",
                 objective=Objective(advantage=Rule("length-weighted group baseline", lambda rewards, lengths, _:
                                                    rewards - (lengths * rewards).sum(1, keepdim=True)
                                                    / lengths.sum(1, keepdim=True).clamp(min=1.0))),
                 fixes=("gradient-variance",))

    @hookimpl
    def po_compute_advantages(self, rewards, batch):
        total = batch.weighted_reward(rewards).view(-1, batch.group_size)
        lengths = batch.completion_lengths.to(total.dtype).view_as(total) * ~torch.isnan(total)
        baseline = torch.nansum(lengths * total, dim=1, keepdim=True) / lengths.sum(dim=1, keepdim=True).clamp(min=1.0)
        batch.log_metric("opo/baseline_mean", baseline.mean().item())
        return (total - baseline).view(-1).nan_to_num(0.0)
