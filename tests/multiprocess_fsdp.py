"""Run on 2 CPU processes with an FSDP request (``accelerate launch --config_file examples/accelerate/fsdp2.yaml``):
accelerate 1.16 cannot shard on CPU processes, so the trainer must refuse the run with one clear error rather than
train plain data-parallel. Each rank writes its outcome (the error, or ``trained`` if a step ran) to
``OUT/rank-N.txt``: the ranks share one stdout, where their lines can run together."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from po_registry import PolicyOptimizationConfig, PolicyOptimizationTrainer  # noqa: E402
from po_registry.errors import OptionError  # noqa: E402
from po_registry.registry import get_task  # noqa: E402
from po_registry.testing import char_tokenizer, partial_credit, tiny_causal_lm  # noqa: E402

out = sys.argv[1]
rank = int(os.environ["RANK"])
tokenizer = char_tokenizer()
model_dir = os.path.join(out, f"model-{rank}")
tiny_causal_lm(tokenizer).save_pretrained(model_dir)
args = PolicyOptimizationConfig(
    output_dir=os.path.join(out, "run"), use_cpu=True, bf16=False, report_to="none", gradient_checkpointing=False,
    per_device_train_batch_size=4, num_generations=4, max_completion_length=4, learning_rate=1e-2, max_steps=2,
    logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0, ddp_backend="gloo")
try:
    trainer = PolicyOptimizationTrainer(model=model_dir, reward_funcs=[partial_credit], args=args,
                                        train_dataset=get_task("addition").dataset(64), processing_class=tokenizer)
    trainer.train()
    outcome = f"trained (fsdp enabled: {trainer.is_fsdp_enabled})"
except OptionError as error:
    outcome = f"refused: {error}"
with open(os.path.join(out, f"rank-{rank}.txt"), "w") as file:
    file.write(outcome)
os._exit(0)  # gloo's threads can abort the interpreter's teardown after the work is done
