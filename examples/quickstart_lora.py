"""LoRA quickstart with the trainer class: GRPO on a tiny offline model, then the same run with a composed method.

    python examples/quickstart_lora.py

Builds a character tokenizer and a small Llama in memory (nothing is downloaded), trains a LoRA adapter for a few
steps on "a+b=" prompts with an exact-match reward and prints the reward per step.
"""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402

from po_registry import PolicyOptimizationConfig, PolicyOptimizationTrainer  # noqa: E402
from po_registry.testing import char_tokenizer, tiny_causal_lm  # noqa: E402


def exact_match(completions, answer, **kwargs):
    """1 for the right sum, plus a little credit for each digit so an untrained model gets a signal."""
    return [float(text.strip() == target) + 0.05 * sum(c.isdigit() for c in text)
            for text, target in zip(completions, answer)]


def main():
    tokenizer = char_tokenizer()
    model = tiny_causal_lm(tokenizer, hidden_size=64, num_layers=2)
    pairs = [(a, b) for a in range(10) for b in range(10)]
    dataset = Dataset.from_dict({"prompt": [f"{a}+{b}=" for a, b in pairs], "answer": [str(a + b) for a, b in pairs]})
    with tempfile.TemporaryDirectory() as output_dir:
        args = PolicyOptimizationConfig(
            output_dir=output_dir,
            methods=["grpo"],
            loss_type="grpo",
            per_device_train_batch_size=16,
            num_generations=8,
            max_completion_length=4,
            learning_rate=5e-3,
            max_steps=10,
            logging_steps=1,
            gradient_checkpointing=False,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
        )
        trainer = PolicyOptimizationTrainer(
            model=model,
            processing_class=tokenizer,
            reward_funcs=[exact_match],
            args=args,
            train_dataset=dataset,
            peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        )
        print(trainer.po_pipeline.assembly.explain())
        trainer.train()
        rewards = [row["reward"] for row in trainer.state.log_history if "reward" in row]
        print("reward per step:", " ".join(f"{r:.3f}" for r in rewards))


if __name__ == "__main__":
    main()
