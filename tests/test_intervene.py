"""Interventions at inference time: steering and InstABoost give the same tokens on every path, and the identity at w=0, m=1."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.generate import Engine, SamplingParams
from posttrain.generate.fast import supports
from posttrain.generate.intervene import Intervention, Steering, attention_bias, boost_columns
from posttrain.generate.scheduler import Scheduler
from posttrain.models.zoo import build_tiny

QUERIES = [
    "write a poem about the sea",
    "name three rivers of europe and say which one is the longest",
    "what is two plus two",
    "describe a cat",
    "tell me about the history of the printing press in a few lines",
]
INSTRUCTIONS = ["Answer in lowercase.", "Use no commas.", "Wrap it in JSON.", "End with the word done.", "Give it a title."]
PROMPTS = [f"{q} {i}" for q, i in zip(QUERIES, INSTRUCTIONS)]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request):
    model, tokenizer = build_tiny(request.param, seed=3)
    return model.eval(), tokenizer


def _unit(d: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(d, generator=torch.Generator().manual_seed(seed)), dim=0)


def _tokens(engine, intervention=None, *, params=None, batch_size=None, instructions=INSTRUCTIONS):
    params = params or SamplingParams(max_new_tokens=14)
    out = engine.generate(
        PROMPTS, params, progress=False, batch_size=batch_size, intervention=intervention, instructions=instructions
    )
    return [[c.token_ids for c in cs] for cs in out]


def _steerings(model):
    d = model.config.hidden_size
    return (Steering(1, _unit(d, 1), "add", 6.0), Steering(0, _unit(d, 2), "adjust", 4.0))


def test_weight_zero_and_boost_one_are_the_model_as_it_is(tiny):
    model, tokenizer = tiny
    u = _unit(model.config.hidden_size, 1)
    for fast in (True, False):
        engine = Engine(model, tokenizer, batch_size=8, fast=fast)
        plain = _tokens(engine)
        assert _tokens(engine, Intervention((Steering(1, u, "add", 0.0),))) == plain
        assert _tokens(engine, Intervention(boost=1.0)) == plain
        assert _tokens(engine, Intervention((Steering(1, u, "add", 0.0),), boost=1.0)) == plain
        # and the interventions are really in the loop: a push or a boost changes the tokens
        assert _tokens(engine, Intervention(_steerings(model))) != plain
        assert _tokens(engine, Intervention(boost=50.0)) != plain


@pytest.mark.parametrize("batch_size", [8, 2])
def test_hooks_and_the_fast_decoder_give_the_same_tokens(tiny, batch_size):
    """Steering (add and adjust on two layers), InstABoost, and both: the model's forward with hooks and a 4-D mask
    against the fast decoder; batch 2 makes the fast decoder admit newcomers into finished rows."""
    model, tokenizer = tiny
    slow = Engine(model, tokenizer, batch_size=batch_size, fast=False)
    fast = Engine(model, tokenizer, batch_size=batch_size, fast=True)
    assert supports(model)
    params = SamplingParams(max_new_tokens=14, temperature=0.8, seed=5, n=2)
    for intervention in (Intervention(_steerings(model)), Intervention(boost=7.0), Intervention(_steerings(model), boost=3.0)):
        want = _tokens(slow, intervention, params=params)
        assert _tokens(fast, intervention, params=params) == want
        assert want != _tokens(slow, params=params)


def test_the_boost_bias_equals_multiplying_and_renormalising_attention(tiny):
    """At the first layer (the same inputs with and without the boost), eager attention weights with the
    boosted mask equal the unboosted weights with the instruction's columns times m, renormalised."""
    model, tokenizer = tiny
    engine = Engine(model, tokenizer)
    ids, spans = engine.prompts.encode_marked(PROMPTS[:2], INSTRUCTIONS[:2])
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[0] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    m = 5.0
    boost = boost_columns(width, spans, [len(x) for x in ids], math.log(m))
    assert (boost > 0).sum() == sum(b - a for a, b in spans)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            plain = model(input_ids=input_ids, attention_mask=attention_bias(mask, torch.zeros_like(boost), width, torch.float32), position_ids=positions, output_attentions=True)
            boosted = model(input_ids=input_ids, attention_mask=attention_bias(mask, boost, width, torch.float32), position_ids=positions, output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
    p = plain.attentions[0]  # (rows, heads, queries, keys)
    scale = torch.where(boost > 0, m, 1.0)[:, None, None, :]
    expected = p * scale / (p * scale).sum(-1, keepdim=True)
    real = mask.bool()[:, None, :, None]  # padding queries attend to nothing real
    torch.testing.assert_close(boosted.attentions[0].masked_select(real), expected.masked_select(real), atol=1e-5, rtol=0)
    assert (boosted.attentions[0] - p).abs().max() > 1e-2  # the boost did move attention


def test_marked_instruction_tokens_decode_to_the_instruction(tiny):
    _, tokenizer = tiny
    engine = Engine(tiny[0], tokenizer)
    ids, spans = engine.prompts.encode_marked(PROMPTS, INSTRUCTIONS[:4] + [None])
    assert ids == engine.encode(PROMPTS)
    for x, span, instruction in zip(ids, spans, INSTRUCTIONS):
        if span is not None:
            assert tokenizer.decode(x[span[0] : span[1]]).strip() == instruction
    assert spans[-1] is None
    with pytest.raises(ValueError, match="not in the prompt"):
        engine.prompts.encode_marked(PROMPTS[:1], ["Speak French."])
    with pytest.raises(ValueError, match="instaboost needs"):
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=2), progress=False, intervention=Intervention(boost=3.0))


def test_requests_with_different_interventions_share_the_scheduler_and_keep_their_tokens(tiny):
    """Queued together, plain, steered and boosted requests each get the tokens Engine.generate gives them alone."""
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, batch_size=4)
    params = SamplingParams(max_new_tokens=10)
    ids, spans = engine.prompts.encode_marked(PROMPTS, INSTRUCTIONS)
    interventions = [None, Intervention(_steerings(model)), Intervention(boost=7.0), Intervention(_steerings(model), boost=3.0), None]
    scheduler = Scheduler(engine, width=4)
    try:
        handles = [
            scheduler.submit(x, params, intervention=iv, instruction=span) for x, span, iv in zip(ids, spans, interventions)
        ]
        for h in handles:
            assert h.done.wait(60)
        served = [[engine.completion(s).token_ids for s in h.seqs] for h in handles]
    finally:
        scheduler.stop()
    for i, iv in enumerate(interventions):
        alone = engine.generate_ids([ids[i]], params, progress=False, intervention=iv, spans=[spans[i]])
        assert served[i] == [c.token_ids for c in alone[0]], i


@pytest.mark.parametrize("fast", [True, False])
def test_one_call_with_an_intervention_per_prompt_equals_each_alone(tiny, fast):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, batch_size=3, fast=fast)
    params = SamplingParams(max_new_tokens=10)
    interventions = [None, Intervention(_steerings(model)), Intervention(boost=7.0), Intervention(_steerings(model), boost=3.0), None]
    together = engine.generate(PROMPTS, params, progress=False, intervention=interventions, instructions=INSTRUCTIONS)
    for i, iv in enumerate(interventions):
        alone = engine.generate([PROMPTS[i]], params, progress=False, intervention=iv, instructions=[INSTRUCTIONS[i]])
        assert together[i][0].token_ids == alone[0][0].token_ids, i
