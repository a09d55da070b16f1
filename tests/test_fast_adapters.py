"""The fast decoder with adapters: rows of the base model, a LoRA and a DoRA adapter in one step, each as its own forward.

The server decodes requests for several adapters over one base in one batch; each row must get exactly
what peft's own forward gives for that adapter (fp32: rounding only), and a prompt longer than the
current column must still find room (the decoder moves its columns right).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import DynamicCache

from posttrain.generate import Engine, SamplingParams, fast
from posttrain.models.zoo import build_tiny

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapted(arch: str):
    """A tiny model with two adapters, randomly initialised (B not zero) so each changes the output."""
    model, tokenizer = build_tiny(arch)
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False), adapter_name="lora")
    peft.add_adapter("dora", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True, init_lora_weights=False))
    with torch.no_grad():  # DoRA starts with m = ||W + sBA||: move it so the magnitude matters
        for name, p in peft.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.1 * torch.rand_like(p))
    return peft.eval(), tokenizer


def forward_logits(peft, adapter: str | None, ids, mask, positions):
    if adapter is None:
        with peft.disable_adapter():
            return peft(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    peft.set_adapter(adapter)
    return peft(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rows_of_each_adapter_match_its_forward(arch):
    peft, _ = adapted(arch)
    assert fast.supports(peft, adapters=True) and not fast.supports(peft)
    ids = torch.tensor([[5, 9, 14, 3, 7, 21, 8]] * 3)
    mask = torch.ones_like(ids)
    positions = torch.arange(7).expand(3, -1)
    names = [None, "lora", "dora"]
    with torch.inference_mode():
        want = torch.cat([forward_logits(peft, a, ids[:1], mask[:1], positions[:1]) for a in names])
        assert (want[0] - want[1]).abs().max() > 1e-2 and (want[0] - want[2]).abs().max() > 1e-2, "the adapters should change the logits"
        decoder = fast.FastDecoder(peft, ["lora", "dora"])
        for row, adapter in enumerate(names):
            cache = DynamicCache(config=peft.config)
            if adapter is None:
                with peft.disable_adapter():
                    peft(input_ids=ids[:1, :-1], past_key_values=cache, use_cache=True)
            else:
                peft.set_adapter(adapter)
                peft(input_ids=ids[:1, :-1], past_key_values=cache, use_cache=True)
            if row == 0:
                decoder.start(cache, mask[:1, :-1], max_new_tokens=4, capacity=3)
            else:
                decoder.length = 6  # every row's prompt ends at the same column here
                decoder.admit([row], cache, mask[:1, :-1], 4, keep=list(range(row)), adapter=row)
        got = decoder.step(ids[:, -1], positions[:, -1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_engine_with_adapters_equals_each_adapter_alone():
    """Greedy through the fast decoder with adapters equals the peft model's own forward, per adapter."""
    peft, tokenizer = adapted("llama")
    items = [f"prompt number {i} " + "word " * (i % 5) for i in range(6)]
    params = SamplingParams(max_new_tokens=10)
    engine = Engine(peft, tokenizer, batch_size=4, adapters=["lora", "dora"])
    assert engine._decoder() is not None
    for adapter in (None, "lora", "dora"):
        got = [c[0].token_ids for c in engine.generate(items, params, progress=False, adapter=adapter)]
        if adapter is None:
            with peft.disable_adapter():
                want = [c[0].token_ids for c in Engine(peft, tokenizer, batch_size=4).generate(items, params, progress=False)]
        else:
            peft.set_adapter(adapter)
            want = [c[0].token_ids for c in Engine(peft, tokenizer, batch_size=4).generate(items, params, progress=False)]
        assert got == want, adapter


class Later:
    """A feed that gives its first sequence at once and the rest a few steps later (a request arriving mid-decode)."""

    def __init__(self, seqs, after: int = 3):
        self.seqs, self.after, self.asked = list(seqs), after, 0

    def waiting(self) -> bool:
        self.asked += 1
        return bool(self.seqs) and (len(self.seqs) > 1 or self.asked > self.after)

    def take(self, k: int):
        if len(self.seqs) > 1 or self.asked > self.after:
            batch, self.seqs = self.seqs[:1], self.seqs[1:]
            return batch
        return []


def test_a_longer_prompt_moves_the_columns_right():
    """A newcomer whose prompt is longer than the current column: the running rows' columns move, nothing changes for them."""
    from posttrain.generate.sequences import plan

    model, tokenizer = build_tiny("llama")
    model.eval()
    engine = Engine(model, tokenizer, batch_size=2)
    short, long = "hi", "a much longer prompt " * 12
    params = SamplingParams(max_new_tokens=12)
    alone = [engine.generate([p], params, progress=False)[0][0].token_ids for p in (short, long)]
    seqs = plan(engine.encode([short, long]), params, engine.stops(params))
    seqs.sort(key=lambda s: len(s.prompt_ids))  # shortest first: the long prompt joins a running batch
    admitted = []
    with engine.session() as decoder:
        assert decoder is not None
        admit = decoder.admit

        def watched(rows, cache, mask, *args, **kwargs):
            admitted.append((decoder.length, mask.shape[1]))
            return admit(rows, cache, mask, *args, **kwargs)

        decoder.admit = watched
        engine.run(Later(seqs), 2, lambda s: None, decoder=decoder, eager=True)
    assert admitted and admitted[0][0] < admitted[0][1], f"the long prompt should arrive while the column is left of its length: {admitted}"
    assert [s.tokens for s in sorted(seqs, key=lambda s: s.prompt)] == alone
