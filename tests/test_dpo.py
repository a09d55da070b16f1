"""DPO on tiny models: preferences are learned, the reference costs no second model, and is cached."""

from __future__ import annotations

import gc
import json
import random
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from sft_fixtures import COLORS, torch_threads

from posttrain.config import load_config
from posttrain.train import dpo, loop
from posttrain.train.forward import SHAPE_QUANTUM, SHARE_MIN, Forward, pack, run
from posttrain.train.runtime import Runtime

WRONG = {obj: sorted(set(COLORS.values()) - {color})[i % 3] for i, (obj, color) in enumerate(sorted(COLORS.items()))}


def write_pairs(path: Path, n: int = 96, seed: int = 0) -> Path:
    """'What color is the X?' → chosen 'The X is <right>.', rejected 'The X is <wrong>.' (learnable)."""
    rng = random.Random(seed)
    objects = sorted(COLORS)
    with path.open("w") as f:
        for _ in range(n):
            obj = rng.choice(objects)
            polite = rng.choice(["", "Please tell me: ", "Quick question. "])
            record = {
                "prompt": [{"role": "user", "content": f"{polite}What color is the {obj}?"}],
                "chosen": [{"role": "assistant", "content": f"The {obj} is {COLORS[obj]}."}],
                "rejected": [{"role": "assistant", "content": f"The {obj} is {WRONG[obj]}."}],
            }
            f.write(json.dumps(record) + "\n")
    return path


def dpo_config(tmp_path: Path, **sections) -> dict:
    cfg = {
        "model": {"name": "tiny-llama"},
        "data": {"path": str(write_pairs(tmp_path / "pairs.jsonl")), "max_length": 128, "eval_fraction": 0.25},
        "train": {"lr": 2e-3, "max_steps": 50, "micro_batch_size": 8, "warmup_steps": 2, "eval_every": 10, "seed": 0, "device": "cpu", "schedule": "constant"},
        "dpo": {"beta": 0.1},
        "output_dir": str(tmp_path / "run"),
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def eval_accuracies(run: Path) -> list[float]:
    return [r["eval_accuracy"] for r in loop.read_metrics(run) if "eval_accuracy" in r]


def test_dpo_learns_held_out_preferences(tmp_path):
    cfg = load_config(dpo_config(tmp_path, train={"eval_every": 5, "bf16": False}), cls=dpo.DPOConfig)  # fp32: step 1 margins are 0 to 1e-4
    with torch_threads(1):
        result = dpo.train(cfg)
    accs = eval_accuracies(result.run_dir)
    # Step 1: policy = reference, so every margin is 0 up to float rounding (batch shapes differ between
    # the precomputed reference and the step), and accuracy is a coin toss.
    first = loop.read_metrics(result.run_dir)[0]
    assert abs(first["margin"]) < 1e-4 and 0.25 <= first["accuracy"] <= 0.75, first
    assert accs[-1] >= 0.9, accs
    assert result.losses[-1] < result.losses[0] < 0.7  # starts at log 2 = 0.693
    rows = loop.read_metrics(result.run_dir)
    assert {"loss", "rewards_chosen", "rewards_rejected", "margin", "accuracy", "logps_chosen", "logps_rejected"} <= set(rows[0])


@pytest.mark.parametrize("loss_type", ["hinge", "ipo", "robust", "simpo", "orpo", "kto"])
def test_every_variant_trains(tmp_path, loss_type):
    extra = {"label_smoothing": 0.1} if loss_type == "robust" else {}
    beta = {"simpo": 2.5, "ipo": 0.5}.get(loss_type, 0.1)
    cfg = load_config(dpo_config(tmp_path, dpo={"loss_type": loss_type, "beta": beta, **extra}, train={"max_steps": 25}), cls=dpo.DPOConfig)
    with torch_threads(1):
        result = dpo.train(cfg)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert sum(result.losses[-5:]) < sum(result.losses[:5]), result.losses
    assert eval_accuracies(result.run_dir)[-1] >= 0.75


def test_kto_mismatched_rows_join_a_prompt_to_another_pairs_response():
    from posttrain.data.chat import IGNORE

    a = {"input_ids": [1, 2, 3, 4, 5], "labels": [IGNORE, IGNORE, IGNORE, 4, 5]}  # prompt 1 2 3, response 4 5
    b = {"input_ids": [7, 8, 9], "labels": [IGNORE, 8, 9]}  # prompt 7, response 8 9
    spliced = dpo.splice(a, b)
    assert list(spliced["input_ids"]) == [1, 2, 3, 8, 9]
    assert list(spliced["labels"]) == [IGNORE, IGNORE, IGNORE, 8, 9]


def packing_setup(tmp_path: Path):
    from transformers import AutoModelForCausalLM

    from posttrain.data.cache import prepare
    from posttrain.data.chat import RenderOptions
    from posttrain.models.load import load_tokenizer, resolve

    # Pairs of different lengths (the question asked 1 to 4 times), so that short sequences share rows.
    path = write_pairs(tmp_path / "pairs.jsonl", n=12)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for i, r in enumerate(records):
        r["prompt"][0]["content"] = " ".join([r["prompt"][0]["content"]] * (1 + i % 4))
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    tokenizer = load_tokenizer("tiny-llama")
    data = prepare(path, tokenizer, RenderOptions(max_length=128), format="preference", cache=tmp_path / "tok")
    model = AutoModelForCausalLM.from_pretrained(resolve("tiny-llama"), dtype=torch.float32).eval()
    return data, Forward(model), tokenizer.pad_token_id


def test_packed_sequences_score_as_if_each_ran_alone(tmp_path):
    from posttrain.data.packing import collate_padded

    # Both ways of running a packed batch: the rows in one call (GPUs), one row with shared prompts (CPU).
    data, rows, pad = packing_setup(tmp_path)
    one_row = Forward(rows.model, one_row=True)
    assert one_row.one_row
    pairs = [0, 3, 5, 7, 11]
    widths = []  # the decoder's input widths
    rows.model.get_decoder().register_forward_pre_hook(lambda m, args, kwargs: widths.append(kwargs["input_ids"].shape), with_kwargs=True)
    for mismatched, module in ((False, rows), (True, rows), (False, one_row), (True, one_row)):
        examples = dpo.pair_examples(data, pairs, mismatched)
        batch = dpo.pair_batch(data, pairs, pad, mismatched)
        assert batch.input_ids.shape[0] < len(examples) and batch.attention_mask is None  # rows hold several sequences
        widths.clear()
        with torch.no_grad():
            sums, counts = run(module, batch, "sums", "counts")
            called = list(widths)
            for j, example in enumerate(examples):
                alone, count = run(rows, collate_padded([example], pad), "sums", "counts")
                assert abs(sums[j].item() - alone.item()) <= 1e-4 * max(1.0, abs(alone.item())), (mismatched, j)
                assert counts[j].item() == count.item() == sum(label != -100 for label in example["labels"])
        if module is one_row:
            # One call over one row: every sequence's tokens once, except that each pair's prompt (its tokens
            # before the first scored one) runs once for its 2 (or, with KTO's mismatched one, 3) sequences, and
            # the prompts' common beginnings (a question asked again, the chat template's) once, where at least
            # SHARE_MIN tokens: the prompts sorted, each shares what it has in common with the one before.
            prompts = sorted(data[2 * i]["input_ids"][: np.flatnonzero(np.asarray(data[2 * i]["labels"]) != -100)[0]].tolist() for i in pairs)
            common = [next((k for k, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y))) for x, y in pairwise(prompts)]
            tokens = sum(len(ex["input_ids"]) for ex in examples) - (2 if mismatched else 1) * sum(map(len, prompts))
            tokens -= sum(n for n in common if n >= SHARE_MIN)
            assert sum(n >= SHARE_MIN for n in common) >= 2  # prompts share beginnings here (the same question, asked again)
            assert called == [torch.Size([1, -(-tokens // SHAPE_QUANTUM) * SHAPE_QUANTUM])], (mismatched, called, tokens)


@pytest.mark.parametrize("checkpointing, held", [(False, False), (True, True), (True, False)])
def test_one_row_gradients_equal_the_rows_gradients(tmp_path, checkpointing, held):
    # Training through the CPU forward: the prompt each pair shares gets the gradients of both its
    # sequences. Gradient checkpointing recomputes the attention in the backward, after the forward has
    # returned: where the caller holds the packed attention through the backward (DPO's loop does) the
    # one row still runs; where it does not, the rows as given (the first version raised there).
    from posttrain.train.packed_attention import packed_attention

    data, rows, pad = packing_setup(tmp_path)
    model = rows.model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = dpo.pair_batch(data, [0, 3, 5, 7], pad, mismatched=True)
    widths = []
    model.get_decoder().register_forward_pre_hook(lambda m, args, kwargs: widths.append(kwargs["input_ids"].shape[0]), with_kwargs=True)

    def gradients(module, hold=False):
        model.zero_grad()
        widths.clear()
        with packed_attention(model, enabled=hold):
            sums = run(module, batch, "sums")
            (sums * torch.linspace(-1.0, 2.0, len(sums))).sum().backward()  # every sequence weighted differently
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want = gradients(rows)
    assert widths[0] == batch.input_ids.shape[0] > 1
    got = gradients(Forward(model, one_row=True), hold=held)
    assert widths[0] == (batch.input_ids.shape[0] if checkpointing and not held else 1)  # one row, or the rows
    assert want.keys() == got.keys() and len(want) > 10
    for name, g in want.items():
        assert (got[name] - g).abs().max().item() <= 1e-4 * g.abs().max().item() + 1e-7, name


def test_gradient_checkpointing_keeps_the_one_row_and_the_losses(tmp_path, monkeypatch):
    # The loop holds the packed attention through each backward, so a checkpointed run on CPU still runs
    # every micro-batch as one row (the layers' recomputation included) and trains exactly as without.
    from transformers.models.llama import modeling_llama

    calls = []
    real = modeling_llama.LlamaModel.forward
    monkeypatch.setattr(modeling_llama.LlamaModel, "forward", lambda self, *a, **k: calls.append(k["input_ids"].shape[0]) or real(self, *a, **k))
    losses = {}
    for checkpointing in (False, True):
        section = {"name": "tiny-llama", "gradient_checkpointing": checkpointing}
        (tmp_path / str(checkpointing)).mkdir()
        cfg = load_config(dpo_config(tmp_path / str(checkpointing), model=section, train={"max_steps": 4, "eval_every": None, "bf16": False}), cls=dpo.DPOConfig)
        calls.clear()
        with torch_threads(1):
            losses[checkpointing] = dpo.train(cfg).losses
        assert calls and set(calls) == {1}, (checkpointing, calls)  # every decoder call over one row
    assert losses[True] == pytest.approx(losses[False], rel=1e-5, abs=1e-6)


def test_precomputed_table_holds_each_pairs_own_log_probs(tmp_path):
    # The precompute packs the whole data set at once; its table must still put every sequence's sum in its
    # pair's row and its kind's column (chosen, rejected, and KTO's mismatched).
    data, module, pad = packing_setup(tmp_path)
    n = len(data) // 2
    for loss_type in ("sigmoid", "kto"):
        cfg = load_config(dpo_config(tmp_path, dpo={"loss_type": loss_type}, train={"micro_batch_size": 2, "bf16": False}), cls=dpo.DPOConfig)
        table, cached, _, _ = dpo.reference_logps(module, data, pad, cfg, Runtime(), cache_root=tmp_path / f"ref-{loss_type}")
        assert not cached and table.shape == (n, 3 if loss_type == "kto" else 2)
        with torch.no_grad():
            for i in range(n):
                sums = run(module, dpo.pair_batch(data, [i], pad, loss_type == "kto"), "sums")
                assert abs(table[i] - sums.double().numpy()).max() <= 1e-4 * max(1.0, abs(table[i]).max()), (loss_type, i)


def test_reference_forwards_hold_whole_pairs_and_share_their_prompts(tmp_path, monkeypatch):
    # On CPU a pair's chosen and rejected sequences run their prompt once only when they are in the same
    # forward: the reference pass gives every forward whole pairs (micro_batch_size of them).
    from posttrain.train import reference

    data, rows, pad = packing_setup(tmp_path)
    n = len(data) // 2
    module = Forward(rows.model, one_row=True)
    for loss_type, columns in (("sigmoid", 2), ("kto", 3)):
        examples = dpo.pair_examples(data, list(range(n)), loss_type == "kto")
        where = {tuple(np.asarray(ex["input_ids"]).tolist()): j for j, ex in enumerate(examples)}
        forwards: list[list[int]] = []

        def recording_pack(group, pad_id, width=None, forwards=forwards, where=where):
            forwards.append([where[tuple(np.asarray(ex["input_ids"]).tolist())] for ex in group])
            return pack(group, pad_id, width)

        monkeypatch.setattr(reference, "pack", recording_pack)
        cfg = load_config(dpo_config(tmp_path, dpo={"loss_type": loss_type}, train={"micro_batch_size": 4, "bf16": False}), cls=dpo.DPOConfig)
        table, _, _, _ = dpo.reference_logps(module, data, pad, cfg, Runtime(), cache_root=tmp_path / f"whole-{loss_type}")
        assert sorted(j for f in forwards for j in f) == list(range(columns * n)), loss_type
        for members in forwards:
            pairs = {j % n for j in members}
            assert len(pairs) <= 4 and sorted(members) == sorted(c * n + i for i in pairs for c in range(columns)), (loss_type, members)
        with torch.no_grad():
            for i in (0, 5, 11):
                alone = run(rows, dpo.pair_batch(data, [i], pad, loss_type == "kto"), "sums").double().numpy()
                assert abs(table[i] - alone).max() <= 1e-4 * max(1.0, abs(alone).max()), (loss_type, i)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_fresh_lora_adapter_is_switched_off_where_it_adds_exactly_nothing(tmp_path, dtype):
    from posttrain.config import AdapterConfig
    from posttrain.models.adapters import adds_nothing, apply_adapter, base_when_exact

    data, rows, pad = packing_setup(tmp_path)
    batch = dpo.pair_batch(data, [0, 3, 5, 7], pad)
    assert not adds_nothing(rows.model)  # no adapter at all
    lora = apply_adapter(rows.model, AdapterConfig(kind="lora", r=4, alpha=8))
    module = Forward(lora, one_row=True)
    called: list[bool] = []
    for m in lora.modules():
        if m.__class__.__name__ == "Linear" and hasattr(m, "lora_A"):
            m.register_forward_pre_hook(lambda mod, args: called.append(bool(mod.disable_adapters)))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    with torch.no_grad(), autocast:
        on = run(module, batch, "sums")
        with base_when_exact(lora) as off:
            without = run(module, batch, "sums")
    assert off and called and all(called[len(called) // 2 :]) and not any(called[: len(called) // 2])
    assert torch.equal(on, without)  # bit for bit: B = 0 adds exact zeros
    # Once the adapter adds something, or with a DoRA magnitude, it stays on.
    next(p for name, p in lora.named_parameters() if "lora_B" in name).data[0, 0] = 1e-3
    with base_when_exact(lora) as off:
        assert not off and not adds_nothing(lora)
    from transformers import AutoModelForCausalLM

    from posttrain.models.load import resolve

    fresh = AutoModelForCausalLM.from_pretrained(resolve("tiny-llama"), dtype=torch.float32)
    assert not adds_nothing(apply_adapter(fresh, AdapterConfig(kind="dora", r=4, alpha=8)))


def test_reference_free_variants_compute_no_reference(tmp_path, monkeypatch):
    monkeypatch.setattr(dpo, "reference_logps", lambda *a, **k: pytest.fail("SimPO must not compute reference log-probs"))
    cfg = load_config(dpo_config(tmp_path, dpo={"loss_type": "simpo", "beta": 2.5}, train={"max_steps": 2, "eval_every": None}, data={"eval_fraction": 0.0}), cls=dpo.DPOConfig)
    with torch_threads(1):
        assert dpo.train(cfg).reference_from_cache is None


@pytest.mark.parametrize("kind", ["lora", "wegeft"])
def test_lora_reference_is_the_disabled_adapter_with_one_model_in_memory(tmp_path, monkeypatch, kind):
    from transformers import LlamaForCausalLM  # tiny-llama's class: one instance = one model's weights

    alive: list[int] = []
    real_log = loop.Metrics.log

    def counting_log(self, record):
        gc.collect()
        alive.append(sum(isinstance(o, LlamaForCausalLM) for o in gc.get_objects()))
        real_log(self, record)

    monkeypatch.setattr(loop.Metrics, "log", counting_log)
    cfg = load_config(
        # LoRA at 2e-2 peaks at step 10 (eval accuracy 1.0) and overshoots after (0.83-0.92 at step 30,
        # depending on float rounding); 1e-2 stays at 1.0 with the eval loss falling. WeGeFT: its update
        # scales with W itself; 2e-2 overshoots here (eval accuracy 0.79-0.88), 5e-3 gives 1.0
        dpo_config(tmp_path, adapter={"kind": kind, "r": 8}, dpo={"reference": "adapter"}, train={"lr": 1e-2 if kind == "lora" else 5e-3, "max_steps": 30}),
        cls=dpo.DPOConfig,
    )
    with torch_threads(1):
        result = dpo.train(cfg)
    assert alive and max(alive) == 1, alive
    assert eval_accuracies(result.run_dir)[-1] >= 0.9
    # A DPO run exports like an SFT run: the adapter merged into a plain transformers model.
    from transformers import AutoModelForCausalLM

    from posttrain.train.sft import export

    merged = AutoModelForCausalLM.from_pretrained(export(result.run_dir, tmp_path / "merged"))
    assert not any("lora" in name or "pairs" in name for name, _ in merged.named_parameters())


def test_precomputed_reference_equals_on_the_fly_and_is_cached(tmp_path):
    # Data no other test uses, so the first run cannot find a cache entry made by another test.
    base = dpo_config(tmp_path, train={"max_steps": 3, "eval_every": None, "bf16": False}, data={"eval_fraction": 0.0, "path": str(write_pairs(tmp_path / "own.jsonl", seed=7))})
    with torch_threads(1):
        first = dpo.train(load_config({**base, "output_dir": str(tmp_path / "a")}, cls=dpo.DPOConfig))
        second = dpo.train(load_config({**base, "output_dir": str(tmp_path / "b")}, cls=dpo.DPOConfig))
        frozen = dpo.train(load_config({**base, "output_dir": str(tmp_path / "c"), "dpo": {"reference": "model"}}, cls=dpo.DPOConfig))
    assert first.reference_from_cache is False and second.reference_from_cache is True
    assert frozen.reference_from_cache is None
    # Same data order, same start: losses with precomputed and on-the-fly reference log-probs agree.
    assert max(abs(a - b) for a, b in zip(first.losses, frozen.losses)) <= 1e-5
    assert first.losses == second.losses


def test_bad_dpo_configs_are_refused_together(tmp_path):
    from posttrain.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(dpo_config(tmp_path, dpo={"loss_type": "robust", "reference": "adapter", "beta": -1}), cls=dpo.DPOConfig)
    text = str(err.value)
    assert "dpo.beta" in text
    with pytest.raises(ConfigError) as err:
        load_config(dpo_config(tmp_path, dpo={"loss_type": "robust", "reference": "adapter"}), cls=dpo.DPOConfig)
    assert "label_smoothing" in str(err.value) and "adapter.kind" in str(err.value)


def test_heap_trimmer_trims_first_and_then_only_past_its_growth_bound(monkeypatch):
    """Trimming after every micro-batch costs page faults; the trimmer trims once, then only when the heap has grown."""
    trims, resident = [], [3.0e9]
    monkeypatch.setattr(dpo, "release_freed_memory", lambda device: trims.append(resident[0]))
    monkeypatch.setattr(dpo, "_resident_bytes", lambda: resident[0])
    trim = dpo.HeapTrimmer(torch.device("cpu"), growth=1.15)
    for size in (3.0e9, 3.2e9, 3.4e9, 3.3e9, 3.6e9, 3.1e9):
        resident[0] = size
        trim()
    assert trims == [3.0e9, 3.6e9] and trim.trims == 2
    dpo.HeapTrimmer(torch.device("meta"))()  # off CPU: nothing to trim
    assert len(trims) == 2
