"""Run under ``torchrun --nproc_per_node 2``: dynamic sampling must decide rounds collectively (no hang) and
keep the per-process batch size. Writes ``result.json`` into the directory given as the first argument."""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from po_registry.config import PolicyOptimizationConfig  # noqa: E402
from po_registry.registry import get_task  # noqa: E402
from po_registry.testing import char_tokenizer, tiny_causal_lm  # noqa: E402
from po_registry.trainer import PolicyOptimizationTrainer  # noqa: E402


def sparse_reward(completions, **kwargs):
    return [float(text[:1] in ("1", "2", "3")) for text in completions]


out = sys.argv[1]
rank = int(os.environ["RANK"])
tokenizer = char_tokenizer()
model_dir = os.path.join(out, f"model-{rank}")
tiny_causal_lm(tokenizer).save_pretrained(model_dir)
config = PolicyOptimizationConfig(
    output_dir=os.path.join(out, "run"), use_cpu=True, bf16=False, report_to="none", gradient_checkpointing=False,
    per_device_train_batch_size=8, num_generations=4, max_completion_length=6, learning_rate=1e-2, max_steps=3,
    logging_steps=1, save_strategy="no", disable_tqdm=True, seed=rank, ddp_backend="gloo",
    methods=["dynamic-sampling"], method_options={"dynamic_sampling_max_rounds": 5})
trainer = PolicyOptimizationTrainer(model=model_dir, reward_funcs=[sparse_reward], args=config,
                                    train_dataset=get_task("addition").dataset(256), processing_class=tokenizer)
trainer.train()
rows = [row for row in trainer.state.log_history if "dynamic_sampling/extra_rounds" in row]
if rank == 0:
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump({"logged": rows, "world_size": trainer.accelerator.num_processes}, f)
torch.distributed.barrier()
torch.distributed.destroy_process_group()
# Skip interpreter teardown: gloo's threads can abort the process there ("terminate called without an active
# exception") after the work is done and written.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
