"""Run under ``torchrun --nproc_per_node 2``: reward-side methods see the whole gathered batch on every process.

For each method, one optimizer step on two processes; the advantages every process computes are recorded and
compared across processes. Writes ``result.json`` into the directory given as the first argument."""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from helpers import build  # noqa: E402

from po_registry.config import PolicyOptimizationConfig  # noqa: E402
from po_registry.testing import char_tokenizer, tiny_causal_lm  # noqa: E402
from po_registry.trainer import PolicyOptimizationTrainer  # noqa: E402

METHODS = {
    "rloo": ({}, {}),
    "reinforce-pp-baseline": ({}, {"beta": 0.04}),
    "gpg": ({}, {}),
    "opo": ({}, {}),
    "maxrl": ({}, {}),
    "remax": ({}, {}),
    "process-reward": ({"process_reward_function": "helpers:digit_token_rewards"}, {}),
    "ppo": ({}, {}),
    "optimal-token-baseline": ({}, {}),
    "sdpo": ({"sdpo_weight": 0.5, "sdpo_success_threshold": 0.1}, {}),
}

out = sys.argv[1]
rank = int(os.environ["RANK"])
tokenizer = char_tokenizer()
model_dir = os.path.join(out, f"model-{rank}")
tiny_causal_lm(tokenizer).save_pretrained(model_dir)
pairs = [(a, b) for a in range(3, 9) for b in range(2, 6)][:16]
dataset = Dataset.from_dict({"prompt": [f"{a}+{b}=" for a, b in pairs], "answer": [str(a + b) for a, b in pairs]})
results = {}
for method, (options, flags) in METHODS.items():
    trainer = build(PolicyOptimizationTrainer, PolicyOptimizationConfig, model_dir, tokenizer, dataset,
                    os.path.join(out, method), methods=[method], method_options=options, max_steps=1,
                    ddp_backend="gloo", **flags)
    seen = []
    compute = trainer.po_pipeline.compute_advantages

    def record(rewards, batch, compute=compute, seen=seen):
        advantages = compute(rewards, batch)
        seen.append({"advantages": advantages.tolist(), "mask": batch.completion_mask.tolist(),
                     "rows": batch.num_rows, "local_rows": int(batch.local["completion_ids"].shape[0])})
        return advantages

    trainer.po_pipeline.compute_advantages = record
    trainer.train()
    if method == "ppo":  # the critic after set-up and one step: every process must hold the same weights
        critic = trainer.po_pipeline.auxiliary["critic"].model
        seen[0]["critic"] = torch.cat([p.detach().reshape(-1) for p in critic.parameters()]).tolist()
    everyone = [None, None]
    torch.distributed.all_gather_object(everyone, seen)
    results[method] = everyone
if rank == 0:
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump({"world_size": torch.distributed.get_world_size(), "methods": results}, f)
torch.distributed.barrier()
torch.distributed.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # gloo's threads can abort the interpreter's teardown after the work is done and written
