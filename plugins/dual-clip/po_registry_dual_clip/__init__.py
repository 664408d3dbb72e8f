"""Dual-clip PPO (Ye et al. 2020, arXiv 1912.09729).

For A < 0 the PPO surrogate min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) is unbounded below as r grows;
dual clip bounds it: J_t = max(min(r A, clip(r) A), c A) for A < 0, with c > 1 (3 by default).
"""

import torch

from po_registry import hookimpl
from po_registry.ops import clipped_surrogate


class DualClip:
    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective

        register(
            "dual-clip",
            components=["dual-clip"],
            summary="dual-clip PPO: bound the loss of negative-advantage tokens at c * |A|",
            targets="a very large ratio on a negative-advantage token yields an unbounded, destabilising update",
            paper="arXiv 1912.09729",
            objective=Objective(),  # at ratio 1 neither clip binds: the baseline's policy gradient
            fixes=("ratio-outliers",),
        )

    @hookimpl
    def po_declare_options(self, register):
        register("dual_clip_c", 3.0, type=float, check=lambda v: v > 1, help="lower-bound factor c, > 1")

    @hookimpl
    def po_policy_objective(self, batch, log_weights):
        args, advantages = batch.args, batch.advantages
        epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        ratio = torch.exp(log_weights)
        ppo = clipped_surrogate(ratio, advantages, args.epsilon, epsilon_high)  # -min(rA, clip(r)A)
        bound = -batch.options["dual_clip_c"] * advantages  # -(c A)
        dual = torch.where(advantages < 0, torch.minimum(ppo, bound), ppo)
        batch.log_metric("dual_clip/ratio", batch.global_masked_mean(((advantages < 0) & (ppo > bound)).float()))
        return dual
