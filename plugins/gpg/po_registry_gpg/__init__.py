"""GPG: group policy gradient (Chu et al. 2025, arXiv 2504.02546).

The plain policy gradient, no surrogate, clip, critic, reference or KL:
L = -(alpha / N_tok) sum_i sum_t A_i log pi_theta(o_{i,t}),  A_i = R_i - mean_G(R),  alpha = B / (B - M),
M = completions in groups whose rewards are all equal. alpha undoes the dilution of the gradient by the groups
that carry none.
"""

from po_registry import hookimpl
from po_registry.ops import aggregate, group_mean, group_std


class GPG:
    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective

        register("gpg", components=["gpg"], paper="arXiv 2504.02546",
                 summary="GPG: plain policy gradient, mean-centred advantages scaled by B/(B-M)",
                 targets="degenerate groups (all-equal rewards) dilute the gradient of the batch",
                 objective=Objective(advantage="mean", scale="free", aggregation="tokens"),  # alpha: a batch scale
                 fixes=("zero-variance-groups",))

    @hookimpl
    def po_check_config(self, args):
        # alpha = B/(B - M) is exact only when nothing else changes the per-completion loss (methods.md rule 1).
        conflicts = {"beta": args.beta != 0.0, "entropy_coef": args.entropy_coef != 0.0,
                     "top_entropy_quantile": args.top_entropy_quantile < 1.0,
                     "mask_truncated_completions": args.mask_truncated_completions,
                     "multi_objective_aggregation": args.multi_objective_aggregation == "normalize_then_sum"}
        bad = [name for name, conflict in conflicts.items() if conflict]
        if bad:
            raise ValueError(f"GPG's B/(B-M) correction is invalid with {', '.join(bad)}: leave them at their "
                             "defaults (beta=0, entropy_coef=0, top_entropy_quantile=1, no masking, sum_then_normalize)")

    @hookimpl
    def po_compute_advantages(self, rewards, batch):
        total = batch.weighted_reward(rewards)
        degenerate = ~(group_std(total, batch.group_size) > 0)  # all-equal (or unscorable) groups
        size = float(total.numel())
        alpha = size / max(size - float(degenerate.sum()), 1.0)
        batch.log_metric("gpg/alpha", alpha)
        return (alpha * (total - group_mean(total, batch.group_size))).nan_to_num(0.0)

    @hookimpl
    def po_policy_objective(self, batch):
        return -batch.advantages * batch.logps

    @hookimpl
    def po_aggregate_loss(self, per_token_loss, batch):
        return aggregate(per_token_loss, batch.mask, "global-token-mean",
                         tokens_per_micro_batch=batch.tokens_per_micro_batch)
