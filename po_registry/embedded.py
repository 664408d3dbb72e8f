"""The embedded model: a character tokenizer and a ~1M-parameter Llama, warm-started on a task so RL has signal.

Nothing is downloaded. The first use of a task trains the warm start (a deterministic supervised pass on the
task's training split that stops once greedy accuracy on a training-split sample reaches ``target_accuracy``, about
a minute on 2 CPU cores) and caches it under ``$PO_REGISTRY_CACHE`` (default ``~/.cache/po-registry``); later uses
load it with ``AutoModelForCausalLM``.
"""

from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

RECIPE_VERSION = 3  # 3: trained on the training split only (held-out prompts never seen)
SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]
CHARACTERS = list(string.digits) + list("+-*=()<>:?,.") + [" "] + list(string.ascii_lowercase) + ["\n"]


def cache_dir() -> Path:
    return Path(os.environ.get("PO_REGISTRY_CACHE", Path.home() / ".cache" / "po-registry"))


def char_tokenizer():
    """A character-level tokenizer (54 tokens: 4 specials, digits, punctuation, space, a-z, newline)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.padding_side = "left"
    return tokenizer


def llama(tokenizer, seed: int = 0, hidden_size: int = 128, num_layers: int = 4, tie: bool = True):
    """A randomly initialised Llama; the defaults give the embedded 1,056,640-parameter model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4 if tie else 2,
        max_position_embeddings=128, tie_word_embeddings=tie, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(config, key))
    return model


def _sft_batch(tokenizer, problems):
    """Right-padded prompt+answer+EOS with the loss on answer and EOS only."""
    ids, labels = [], []
    for prompt, answer in problems:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
    label_ids = torch.tensor([x + [-100] * (width - len(x)) for x in labels])
    attention = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    return input_ids, attention, label_ids


def warm_start(task, seed: int = 0, target_accuracy: float = 0.3, max_steps: int = 1500, batch_size: int = 128,
               eval_every: int = 25, progress: Callable[[int, float, float | None], None] | None = None,
               model=None, min_steps: int = 0):
    """Supervised warm start on ``task``: AdamW lr 3e-3, 100 warm-up steps, fresh training-split problems every
    step; stops at the first evaluation (every ``eval_every`` steps from step 100) whose greedy accuracy on a
    training-split sample reaches ``target_accuracy``, and not before ``min_steps``. Continues training ``model``
    when one is given. Returns (model, tokenizer, accuracy, steps)."""
    tokenizer = char_tokenizer()
    model = model if model is not None else llama(tokenizer, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 100))
    # Trained and stopped on the training split only: the held-out split stays unseen until RL is scored on it.
    validation = task.problems(256, seed=VALIDATION_SEED)
    accuracy = 0.0
    model.train()
    for step in range(1, max_steps + 1):
        input_ids, attention, labels = _sft_batch(tokenizer, task.problems(batch_size, seed=seed * 1_000_003 + step))
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        evaluated = step >= max(100, min_steps) and step % eval_every == 0
        if evaluated:
            accuracy = task.evaluate(model, tokenizer, validation)
        if progress is not None:
            progress(step, loss.item(), accuracy if evaluated else None)
        if evaluated and accuracy >= target_accuracy:
            break
    model.eval()
    return model, tokenizer, accuracy, step


WARM_START_ACCURACY = 0.3
VALIDATION_SEED = -1  # the warm start's stopping sample, from the training split (no step's seed)


def embedded_model_dir(task, seed: int = 0, progress=None, target_accuracy: float = WARM_START_ACCURACY) -> Path:
    """The cached warm start for ``task`` (built on first use): a directory ``from_pretrained`` loads.

    A higher ``target_accuracy`` gives a stronger checkpoint (a teacher for distillation): the default warm start
    trained further until it reaches that accuracy."""
    suffix = "" if target_accuracy == WARM_START_ACCURACY else f"-acc{round(100 * target_accuracy)}"
    target = cache_dir() / f"embedded-{task.name}-seed{seed}-v{RECIPE_VERSION}{suffix}"
    if (target / "warm_start.json").exists():
        return target
    start = None
    if target_accuracy > WARM_START_ACCURACY:
        from transformers import AutoModelForCausalLM

        start = AutoModelForCausalLM.from_pretrained(embedded_model_dir(task, seed, progress)).train()
    model, tokenizer, accuracy, steps = warm_start(task, seed=seed, target_accuracy=target_accuracy,
                                                   progress=progress, model=start,
                                                   min_steps=0 if start else getattr(task, "warm_start_steps", 0))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "warm_start.json").write_text(json.dumps({"task": task.name, "seed": seed, "steps": steps,
                                                          "validation_accuracy": accuracy}))
    if target.exists():  # another process finished first
        shutil.rmtree(staging)
    else:
        staging.rename(target)
    return target
