"""Shared builders for the trainer tests."""

from __future__ import annotations

import torch


def digit_reward(completions, answer, **kwargs):
    """Partial credit: matching leading characters plus a small bonus per digit, so groups have spread."""
    scores = []
    for text, target in zip(completions, answer):
        prefix = 0
        for got, want in zip(text, target):
            if got != want:
                break
            prefix += 1
        scores.append(prefix / len(target) + 0.1 * sum(ch.isdigit() for ch in text))
    return scores


def base_config(tmp_path, **overrides) -> dict:
    config = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        learning_rate=1e-2,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    config.update(overrides)
    return config


def build(trainer_cls, config_cls, model, tokenizer, dataset, tmp_path, peft=False, reward=digit_reward,
          **overrides):
    from peft import LoraConfig

    torch.manual_seed(0)
    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]) if peft else None
    return trainer_cls(
        model=model,
        reward_funcs=reward if isinstance(reward, list) else [reward],
        args=config_cls(**base_config(tmp_path, **overrides)),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def generation_rows(dataset, trainer, prompts=4):
    G = trainer.num_generations
    return [dict(dataset[i]) for i in range(prompts) for _ in range(G)]


def digit_token_rewards(completions, completion_ids, **kwargs):
    """A per-token process reward: 1 for each digit token, 0 otherwise."""
    return [[1.0 if str(text)[i:i + 1].isdigit() else 0.0 for i in range(len(ids))]
            for text, ids in zip(completions, completion_ids)]
