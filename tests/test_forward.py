"""The one forward every loop uses: packed sequences give what each sequence gives alone, whatever the output."""

from __future__ import annotations

import pytest
import torch

from posttrain.config import ModelConfig
from posttrain.data.chat import IGNORE
from posttrain.data.packing import collate_padded
from posttrain.models.load import load_model
from posttrain.train import ppo
from posttrain.train.forward import (
    SHAPE_QUANTUM,
    SHARE_MIN,
    Forward,
    pack,
    per_sequence,
    run,
    scored_examples,
    scored_mask,
    shared_row,
    spans_of,
)
from posttrain.train.losses import token_entropy

# Three prompts; the first has three completions (a GRPO group), the others one each; 6 to 15 tokens.
PROMPTS = [[5, 17, 42, 99], [8, 2, 61], [30, 31, 32, 33, 34, 35]]
SEQUENCES = [
    PROMPTS[0] + [7, 3],
    PROMPTS[0] + [11, 12, 13, 14, 15],
    PROMPTS[1] + [5, 9, 9, 9, 4, 1, 2, 3, 3, 3, 3, 3],
    PROMPTS[0] + [7, 21, 22],
    PROMPTS[2] + [40, 41, 42],
]
PROMPT_LENGTHS = [4, 4, 3, 4, 6]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    lm = load_model(ModelConfig(name="tiny-llama", dtype="float32"), torch.device("cpu")).eval()
    head = torch.nn.Linear(lm.config.hidden_size, 1)
    return lm, head


def alone(module: Forward, seq: list[int], p: int, *want: str):
    """``want`` of one sequence run by itself in a padded row of its own (the model's own attention, with a mask)."""
    batch = collate_padded(scored_examples([seq], [p]), pad_id=0)
    return run(module, batch, *want)


@pytest.mark.parametrize("one_row", [False, True])
def test_every_output_of_packed_sequences_equals_each_sequence_alone(model, one_row):
    lm, head = model
    module = Forward(lm, head, one_row=one_row)
    assert module.one_row == one_row
    batch = pack(scored_examples(SEQUENCES, PROMPT_LENGTHS), pad_id=0)
    assert batch.input_ids.shape[0] < len(SEQUENCES) and batch.attention_mask is None  # rows hold several sequences
    with torch.no_grad():
        logps, values, entropy, sums, counts, scores = run(module, batch, "logps", "values", "entropy", "sums", "counts", "scores")
        at = 0
        for j, (seq, p) in enumerate(zip(SEQUENCES, PROMPT_LENGTHS)):
            n = len(seq)
            a_logps, a_values, a_entropy, a_sums, a_counts, a_scores = alone(
                Forward(lm, head), seq, p, "logps", "values", "entropy", "sums", "counts", "scores"
            )
            torch.testing.assert_close(logps[at : at + n], a_logps, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(values[at : at + n], a_values, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(entropy[at : at + n], a_entropy, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(sums[j], a_sums[0], atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(scores[j], a_scores[0], atol=1e-5, rtol=1e-5)
            assert counts[j].item() == a_counts[0].item() == n - p  # every completion token, the prompt none
            assert (logps[at : at + p - 1] == 0).all() and (logps[at + p - 1 : at + n - 1] < 0).all() and logps[at + n - 1] == 0
            at += n
        assert at == logps.shape[0] == sum(len(s) for s in SEQUENCES)
        # nll is the summed negative log-likelihood of the scored tokens, in either layout
        torch.testing.assert_close(run(module, batch, "nll"), -sums.sum(), atol=1e-4, rtol=1e-5)


def test_entropy_is_the_entropy_of_the_next_token_distribution(model):
    lm, _ = model
    seq, p = SEQUENCES[2], PROMPT_LENGTHS[2]
    with torch.no_grad():
        got = alone(Forward(lm), seq, p, "entropy")
        logits = lm(torch.tensor([seq])).logits[0].double()
        want = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    scored = torch.zeros(len(seq), dtype=torch.bool)
    scored[p - 1 : len(seq) - 1] = True
    torch.testing.assert_close(got[scored].double(), want[scored], atol=1e-4, rtol=1e-4)
    assert (got[~scored] == 0).all()
    hidden = lm.get_decoder()(input_ids=torch.tensor([seq]))[0]
    targets = torch.full((1, len(seq)), IGNORE)
    assert (token_entropy(hidden, targets, lm.get_output_embeddings()) == 0).all()


def test_one_row_runs_a_shared_prompt_once_and_pads_only_its_end(model):
    lm, _ = model
    batch = pack(scored_examples(SEQUENCES, PROMPT_LENGTHS), pad_id=0)
    ids, _, index = shared_row(batch.input_ids, batch.target_ids, spans_of(batch))
    # The group of three completions of prompt 0 runs that prompt once: two of its three copies are not computed.
    tokens = sum(len(s) for s in SEQUENCES) - 2 * len(PROMPTS[0])
    assert ids.shape == (-(-tokens // SHAPE_QUANTUM) * SHAPE_QUANTUM,) and len(index) == sum(len(s) for s in SEQUENCES)
    widths = []
    hook = lm.get_decoder().register_forward_pre_hook(lambda m, args, kwargs: widths.append(kwargs["input_ids"].shape), with_kwargs=True)
    try:
        with torch.no_grad():
            run(Forward(lm, one_row=True), batch, "logps")
    finally:
        hook.remove()
    assert widths == [torch.Size([1, ids.shape[0]])]


# A system prompt every sequence starts with (SHARE_MIN tokens), two user turns after it, and samples of them
# (two of the first, three of the second) given out of order; the last sequence shares only 3 tokens with any.
SYSTEM = [3, 1, 4, 1, 5, 9, 2, 6][:SHARE_MIN]
TURNS = [SYSTEM + [70, 71, 72], SYSTEM + [80, 81, 82, 83]]
NESTED = [TURNS[1] + [7, 3], TURNS[0] + [11, 12, 13], TURNS[1] + [5, 9, 9], TURNS[0] + [7, 21], TURNS[1] + [40], SYSTEM[:3] + [90, 91, 92]]
NESTED_PROMPTS = [len(TURNS[1]), len(TURNS[0]), len(TURNS[1]), len(TURNS[0]), len(TURNS[1]), 5]


def test_nested_prefixes_run_once_and_every_sequence_gets_what_it_gets_alone(model):
    """One row runs the system prompt once for all but the last sequence, and each user turn once for its samples;
    the log-probs and their gradients equal those of each sequence run alone."""
    lm, _ = model
    batch = pack(scored_examples(NESTED, NESTED_PROMPTS), pad_id=0)
    ids, positions, index = shared_row(batch.input_ids, batch.target_ids, spans_of(batch))
    tokens = sum(map(len, NESTED)) - 4 * len(SYSTEM) - 1 * 3 - 2 * 4  # the system prompt 5 more times; turn 0 once, turn 1 twice
    assert int((ids != 0).sum()) == tokens and len(index) == sum(map(len, NESTED))
    assert torch.equal(ids[index], torch.cat([torch.tensor(s) for s in NESTED]))  # every sequence's tokens, end to end
    assert torch.equal(positions[index], torch.cat([torch.arange(len(s)) for s in NESTED]))

    lm.zero_grad()
    logps = run(Forward(lm, one_row=True), batch, "logps")
    logps.sum().backward()
    packed = [p.grad.clone() for p in lm.parameters()]
    lm.zero_grad()
    at, wanted = 0, []
    for seq, p in zip(NESTED, NESTED_PROMPTS):
        one = alone(Forward(lm), seq, p, "logps")
        wanted.append(one.detach())
        one.sum().backward()
        torch.testing.assert_close(logps[at : at + len(seq)].detach(), wanted[-1], atol=1e-5, rtol=1e-5)
        at += len(seq)
    for ours, want in zip(packed, (p.grad for p in lm.parameters())):
        torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-4)
    lm.zero_grad()


def test_per_sequence_layout_and_scored_mask():
    batch = pack(scored_examples(SEQUENCES, PROMPT_LENGTHS), pad_id=0)
    mask = scored_mask(batch)
    assert mask.shape == (len(SEQUENCES), max(len(s) for s in SEQUENCES))
    for i, (seq, p) in enumerate(zip(SEQUENCES, PROMPT_LENGTHS)):
        assert mask[i].nonzero().flatten().tolist() == list(range(p - 1, len(seq) - 1))
    flat = torch.arange(1.0, 1 + sum(len(s) for s in SEQUENCES))
    laid = per_sequence(flat, [len(s) for s in SEQUENCES])
    assert laid[1, : len(SEQUENCES[1])].tolist() == flat[len(SEQUENCES[0]) : len(SEQUENCES[0]) + len(SEQUENCES[1])].tolist()
    assert laid[0, len(SEQUENCES[0]) :].eq(0).all()


def test_ppo_rollouts_are_packed_and_come_back_in_their_own_rows(model):
    from posttrain.generate.params import Completion

    lm, _ = model
    completions = [
        Completion(prompt_token_ids=s[:p], token_ids=s[p:], text="", finish_reason="stop", num_tokens=len(s) - p)
        for s, p in zip(SEQUENCES, PROMPT_LENGTHS)
    ]
    rollouts = ppo.make_rollouts(completions, torch.device("cpu"))
    models = ppo.PPOModels(ppo.policy_with_value(lm), reference=lm)
    widths = []
    hook = lm.get_decoder().register_forward_pre_hook(
        lambda m, args, kwargs: widths.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        logps, values, _ = ppo.in_micro_batches(models.rollout_stats, rollouts, 3, pad_id=0)
        (ref,) = ppo.in_micro_batches(models.reference_logps, rollouts, 3, pad_id=0)
    finally:
        hook.remove()
    # micro-batches of 3 then 2 sequences, each packed into rows no wider than its longest sequence
    assert rollouts.batch([0, 1, 2], 0).attention_mask is None
    assert widths[0][1] == max(len(s) for s in SEQUENCES[:3]) and widths[1][1] == max(len(s) for s in SEQUENCES[3:])
    assert widths[0][0] * widths[0][1] < sum(len(s) for s in SEQUENCES[:3]) + widths[0][1]  # padding only at rows' ends
    torch.testing.assert_close(logps, ref)  # the same weights: the reference gives the policy's log-probs
    assert (values == 0).all()  # the value head starts at zero
    for i, (seq, p) in enumerate(zip(SEQUENCES, PROMPT_LENGTHS)):
        with torch.no_grad():
            want = alone(Forward(lm), seq, p, "logps")
        torch.testing.assert_close(logps[i, : len(seq)], want, atol=1e-5, rtol=1e-5)
        assert (logps[i, len(seq) :] == 0).all() and rollouts.mask[i].nonzero().flatten().tolist() == list(range(p - 1, len(seq) - 1))


def test_unknown_outputs_and_missing_heads_are_refused(model):
    lm, _ = model
    batch = pack(scored_examples(SEQUENCES[:2], PROMPT_LENGTHS[:2]), pad_id=0)
    with pytest.raises(ValueError, match="cannot give"):
        run(Forward(lm), batch, "logits")
    with pytest.raises(ValueError, match="no scalar head"):
        run(Forward(lm), batch, "scores")
