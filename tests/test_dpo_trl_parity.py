"""Parity with TRL's DPOTrainer: same tiny model, tokens, batches and optimizer -> the same sigmoid-DPO losses.

Acceptance point of the preference work: posttrain's loss equals TRL's at step 0 within 1e-4 (both are
log 2 there: policy = reference) and stays within 1e-3 over 10 optimizer steps, with a learning rate
large enough that the loss really moves. TRL is a test dependency only (``pip install -e .[test]``).

The comparison is made exact by construction, and the test checks each part rather than assuming it:

* weights: tiny-llama from its zoo directory for both, fp32 on CPU, one thread; it has no dropout
  (attention_dropout 0, TRL disables any anyway), and TRL's reference is a second copy of the same files,
  as posttrain's precomputed reference is the initial model.
* tokens: TEXT preference records (no chat template). posttrain tokenizes prompt+completion jointly and
  scores the tokens overlapping the completion, then appends EOS (by id) and scores it; TRL tokenizes
  prompt and prompt+completion+eos_token (as text) and scores what follows their common prefix. With
  prompts ending in "?" and completions starting with a space the byte-level BPE splits at the boundary
  either way, and the EOS text is the single EOS token, so both score the same ids at the same positions;
  the test compares them sequence by sequence before training.
* batches: 8 pairs, batch 8, no accumulation: each step is every pair, so neither side's shuffling can
  change a step's loss (the mean over its pairs). TRL's 10 steps are 10 epochs.
* optimizer: torch AdamW (TRL/transformers default is the fused kernel: ``optim="adamw_torch"`` picks the
  same implementation posttrain uses), same lr, betas, eps, weight decay 0, constant schedule without
  warmup, max_grad_norm 1; beta 0.1. TRL's own defaults that would differ are set: bf16 (TRL turns it on
  by default), gradient checkpointing (on by default in TRL; it does not change the math, only the time).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from sft_fixtures import torch_threads

from posttrain.config import load_config
from posttrain.data.chat import ChatRenderer
from posttrain.models.load import load_tokenizer, resolve
from posttrain.train import dpo, loop

import trl  # noqa: E402,F401 - a declared test dependency: missing, these tests fail rather than skip

STEPS = 10
LR = 1e-3
BETA = 0.1
BETAS = (0.9, 0.999)
MAX_GRAD_NORM = 1.0

# Prompt ends in "?", completions start with a space: the token boundary is the same whether prompt and
# completion are tokenized together (posttrain) or the prompt is also tokenized alone (TRL's prefix).
PAIRS = [
    ("What color is the sky?", " The sky is blue.", " The sky is green."),
    ("What color is the grass?", " The grass is green.", " The grass is red."),
    ("What color is the snow?", " The snow is white.", " The snow is black."),
    ("What color is the coal?", " The coal is black.", " The coal is white."),
    ("What color is the banana?", " The banana is yellow.", " The banana is purple."),
    ("What color is the plum?", " The plum is purple.", " The plum is yellow."),
    ("What color is the cherry?", " The cherry is red.", " The cherry is blue."),
    ("What color is the ocean?", " The ocean is blue.", " The ocean is orange."),
]
RECORDS = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]


def posttrain_run(tmp_path: Path, lr: float = LR) -> tuple[list[float], list[float]]:
    """(loss, pre-clipping gradient norm) of each of posttrain's steps."""
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    cfg = load_config(
        {
            "model": {"name": "tiny-llama", "dtype": "float32"},
            "data": {"path": str(path), "max_length": 128, "eval_fraction": 0.0},
            "train": {
                "lr": lr,
                "betas": list(BETAS),
                "weight_decay": 0.0,
                "schedule": "constant",
                "warmup_steps": 0,
                "max_steps": STEPS,
                "micro_batch_size": len(RECORDS),
                "grad_accum": 1,
                "max_grad_norm": MAX_GRAD_NORM,
                "bf16": False,
                "seed": 0,
                "device": "cpu",
            },
            "dpo": {"loss_type": "sigmoid", "beta": BETA, "reference": "precompute"},
            "output_dir": str(tmp_path / "posttrain-run"),
        },
        cls=dpo.DPOConfig,
    )
    result = dpo.train(cfg)
    assert result.steps == STEPS
    return result.losses, [row["grad_norm"] for row in loop.read_metrics(result.run_dir) if "grad_norm" in row]


def trl_trainer(tmp_path: Path, captured: list[float]):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    class RecordingDPOTrainer(DPOTrainer):
        """Records each training step's loss at full precision (the log history is also checked below)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                captured.append((loss[0] if return_outputs else loss).detach().item())
            return loss

    directory = resolve("tiny-llama")

    def load():
        return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="sdpa")

    model, ref_model = load(), load()
    assert model.config.attention_dropout == 0.0
    # TRL turns checkpointing on by default (math unchanged, slower); transformers 5 renamed the argument.
    no_checkpointing = (
        {"activation_checkpointing": False}
        if "activation_checkpointing" in DPOConfig.__dataclass_fields__
        else {"gradient_checkpointing": False}
    )
    args = DPOConfig(
        output_dir=str(tmp_path / "trl-run"),
        per_device_train_batch_size=len(RECORDS),
        gradient_accumulation_steps=1,
        max_steps=STEPS,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=BETAS[0],
        adam_beta2=BETAS[1],
        adam_epsilon=1e-8,  # torch.optim.AdamW's default, which posttrain uses
        optim="adamw_torch",
        max_grad_norm=MAX_GRAD_NORM,
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=128,
        precompute_ref_log_probs=False,
        disable_dropout=True,
        bf16=False,
        use_cpu=True,
        seed=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
        **no_checkpointing,
    )
    return RecordingDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=Dataset.from_list(RECORDS),
        processing_class=load_tokenizer("tiny-llama"),
    )


def assert_same_scored_tokens(trainer) -> None:
    """Every sequence: TRL's prompt+completion ids = posttrain's input_ids, and TRL's completion = our scored tokens."""
    renderer = ChatRenderer(load_tokenizer("tiny-llama"))
    data = trainer.train_dataset
    assert len(data) == len(RECORDS)
    for i, record in enumerate(RECORDS):
        ours = renderer.render_preference(record)
        for side, example in zip(("chosen", "rejected"), ours):
            prompt_ids, completion_ids = data[i]["prompt_ids"], data[i][f"{side}_ids"]
            assert prompt_ids + completion_ids == example["input_ids"], (i, side)
            scored = [k for k, label in enumerate(example["labels"]) if label != -100]
            assert scored == list(range(len(prompt_ids), len(prompt_ids) + len(completion_ids))), (i, side)
            assert completion_ids[-1] == trainer.processing_class.eos_token_id  # both score the EOS


def test_sigmoid_dpo_matches_trl_over_ten_steps(tmp_path):
    with torch_threads(1):
        t0 = time.perf_counter()
        ours, our_norms = posttrain_run(tmp_path)
        t1 = time.perf_counter()
        captured: list[float] = []
        trainer = trl_trainer(tmp_path, captured)
        assert_same_scored_tokens(trainer)
        trainer.train()
        t2 = time.perf_counter()

    logged = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    their_norms = [row["grad_norm"] for row in trainer.state.log_history if "grad_norm" in row]
    assert len(captured) == len(logged) == STEPS, (captured, logged)
    assert max(abs(a - b) for a, b in zip(captured, logged)) <= 1e-6  # the log is the step's loss
    theirs = captured
    diffs = [abs(a - b) for a, b in zip(ours, theirs)]
    report = "\n".join(
        f"step {k}: loss posttrain {a:.6f}  trl {b:.6f}  |diff| {d:.1e}   grad norm posttrain {g:.4f}  trl {h:.4f}"
        for k, (a, b, d, g, h) in enumerate(zip(ours, theirs, diffs, our_norms, their_norms))
    )
    print(f"\nposttrain {t1 - t0:.1f}s, trl {t2 - t1:.1f}s\n{report}")

    assert abs(ours[0] - math.log(2)) <= 1e-4 and abs(theirs[0] - math.log(2)) <= 1e-4, report
    assert diffs[0] <= 1e-4, report
    assert max(diffs) <= 1e-3, report
    # Same gradients before clipping (step 0's norm is above max_grad_norm, so clipping is exercised too).
    assert len(our_norms) == len(their_norms) == STEPS and our_norms[0] > MAX_GRAD_NORM, report
    assert all(abs(g - h) <= 1e-3 * max(1.0, h) for g, h in zip(our_norms, their_norms)), report
    # The comparison means something only if training moved the loss well away from log 2.
    assert ours[-1] < ours[0] - 0.05 and theirs[-1] < theirs[0] - 0.05, report
