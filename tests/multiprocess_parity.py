"""Run under ``torchrun --nproc_per_node 2``: our trainer and TRL's on two processes must stay identical.

Writes ``result.json`` (max parameter difference, losses) into the directory given as the first argument."""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from helpers import build  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from po_registry.config import PolicyOptimizationConfig  # noqa: E402
from po_registry.testing import char_tokenizer, tiny_causal_lm  # noqa: E402
from po_registry.trainer import PolicyOptimizationTrainer  # noqa: E402

out = sys.argv[1]
rank = int(os.environ["RANK"])
tokenizer = char_tokenizer()
model_dir = os.path.join(out, f"model-{rank}")  # the same seeded model, one copy per rank: no race on the files
tiny_causal_lm(tokenizer).save_pretrained(model_dir)
pairs = [(a, b) for a in range(3, 9) for b in range(2, 6)][:16]
dataset = Dataset.from_dict({"prompt": [f"{a}+{b}=" for a, b in pairs], "answer": [str(a + b) for a, b in pairs]})
flags = dict(loss_type="dapo", beta=0.04, gradient_accumulation_steps=2, num_iterations=2, max_steps=2,
             top_entropy_quantile=0.5, ddp_backend="gloo")
results = {}
for name, trainer_cls, config_cls in [("stock", GRPOTrainer, GRPOConfig),
                                      ("ours", PolicyOptimizationTrainer, PolicyOptimizationConfig)]:
    trainer = build(trainer_cls, config_cls, model_dir, tokenizer, dataset, os.path.join(out, name), **flags)
    trainer.train()
    results[name] = trainer
params = [(p - q).abs().max().item() for p, q in zip(results["stock"].model.parameters(),
                                                      results["ours"].model.parameters())]
losses = {name: [row["loss"] for row in t.state.log_history if "loss" in row] for name, t in results.items()}
if rank == 0:
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump({"max_param_diff": max(params), "losses": losses,
                   "world_size": results["ours"].accelerator.num_processes}, f)
torch.distributed.barrier()
torch.distributed.destroy_process_group()
# Skip interpreter teardown: gloo's threads can abort the process there ("terminate called without an active
# exception") after the work is done and written.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
