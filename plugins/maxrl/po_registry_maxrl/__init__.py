"""MaxRL mean scaling (arXiv 2602.02710): A_i = (R_i - mean_G(R)) / (mean_G(R) + eps).

For 0/1 rewards the group mean is the success rate p, so the advantage is normalised by p instead of the std:
rare successes on hard prompts get large positive advantages.
"""

from po_registry import hookimpl
from po_registry.ops import group_mean


class MaxRL:
    @hookimpl
    def po_register_methods(self, register):
        register("maxrl", components=["maxrl"], side="reward", paper="arXiv 2602.02710",
                 summary="MaxRL: advantages scaled by the group mean reward (the success rate for 0/1 rewards)",
                 targets="std scaling's difficulty bias; learning from rare successes on hard prompts")

    @hookimpl
    def po_declare_options(self, register):
        register("maxrl_eps", 1e-4, type=float, check=lambda v: v > 0, help="added to the group mean, > 0")

    @hookimpl
    def po_compute_advantages(self, rewards, batch):
        total = batch.weighted_reward(rewards)
        mean = group_mean(total, batch.group_size)
        return ((total - mean) / (mean + batch.options["maxrl_eps"])).nan_to_num(0.0)
