"""REINFORCE++ (Hu et al. 2025, arXiv 2501.03262).

Per-token reward r_t = 1[t = |o|] R - beta * KL_t with the k1 estimate KL_t = log pi_old(o_t) - log pi_ref(o_t);
return-to-go A_t = sum_{s >= t} gamma^(s - t) r_s; then *global* normalisation over every loss token of the
batch, A <- (A - mean) / std. REINFORCE++-baseline first subtracts the group mean of R (k > 1 samples per prompt).
"""

import torch

from po_registry import hookimpl
from po_registry.ops import group_mean, masked_sum, masked_whiten, outcome_token_rewards, returns_to_go

PAPER = "arXiv 2501.03262"


class ReinforcePP:
    po_reads = ("token_rewards",)  # dense rewards join the return-to-go
    name = "reinforce-pp"
    summary = "REINFORCE++: return-to-go of the outcome reward minus per-token KL, normalised over the whole batch"
    baseline = False

    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Dense, Objective

        register(self.name, components=[self.name], replaces=["reference-kl"], paper=PAPER,
                 summary=self.summary,
                 targets="prompt-local normalisation is biased and overfits; A explodes when the group std is ~0",
                 objective=lambda args, options: Objective(  # whitened over the batch: a batch-set scale
                     not_applicable="a discount < 1 of the outcome's return is not modelled" if options[
                         f"{self.name.replace('-', '_')}_gamma"] < 1 else "",
                     kl_reference=args.beta or None, advantage="mean" if self.baseline else "none", scale="free",
                     dense=(Dense("reference", args.beta),) if args.beta else ()),
                 fixes=("gradient-variance",))

    @hookimpl
    def po_declare_options(self, register):
        register(f"{self.name.replace('-', '_')}_gamma", 1.0, type=float, check=lambda v: 0 < v <= 1,
                 help="discount of the return-to-go, in (0, 1]")

    @hookimpl
    def po_token_rewards(self, batch):
        beta = batch.args.beta
        if beta == 0.0:
            return None
        kl = batch.policy_logps() - batch.local["ref_per_token_logps"]  # k1, on the sampled tokens
        mask = batch.local_mask  # the policy's tokens: environment tokens inside a completion are not its samples
        total, tokens = batch.gather(torch.stack([masked_sum(kl, mask), mask.sum()]).reshape(1, 2)).sum(0)
        batch.log_metric(f"{self.name}/kl", (total / tokens.clamp(min=1.0)).item())  # over every process's tokens
        return -beta * kl * mask

    @hookimpl
    def po_compute_advantages(self, rewards, batch):
        total = batch.weighted_reward(rewards)
        scorable = ~torch.isnan(total)
        if self.baseline:
            total = total - group_mean(total, batch.group_size)
        mask = batch.completion_mask * scorable.unsqueeze(1)
        per_token = outcome_token_rewards(total.nan_to_num(0.0), mask, batch.token_rewards)
        advantages = returns_to_go(per_token, batch.options[f"{self.name.replace('-', '_')}_gamma"], mask)
        return masked_whiten(advantages, mask)


class ReinforcePPBaseline(ReinforcePP):
    name = "reinforce-pp-baseline"
    summary = "REINFORCE++-baseline: group-mean baseline, then return-to-go and global batch normalisation"
    baseline = True
