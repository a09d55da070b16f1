"""`posttrain serve --steer FILE`: steering and InstABoost chosen per request, driven by the `openai` client.

A served request with ``steer`` (and ``instaboost`` with its ``instruction``) must give, greedy, exactly the
tokens :meth:`Engine.generate` gives with the same :class:`Intervention` and instructions, which differ
from the unsteered ones; streamed, the same text; queued together with plain requests, each its own
tokens. Every bad field is a 400 naming it, and the server stays up.
"""

from __future__ import annotations

import threading

import openai
import pytest
import torch
from openai import OpenAI
from serve_fixtures import served

from posttrain.generate import Engine, SamplingParams
from posttrain.generate.intervene import Intervention
from posttrain.models.load import load_tokenizer, resolve
from posttrain.steer.vectors import Direction, SteeringSet

MODEL = "tiny-llama"
TITLE, COMMA = "detectable_format:title", "punctuation:no_comma"
FILE_BOOST = 5.0
INSTRUCTION = "Give it a title."
CHATS = [
    [{"role": "user", "content": f"Write a short poem about the sea. {INSTRUCTION}"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Tell me about item 3 please. {INSTRUCTION}"}],
]
TEXT = f"Once upon a time, there was a little robot. {INSTRUCTION} The robot"
TOKENS = 16


def _base():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve(MODEL)).eval()


def _steering_file(path) -> None:
    """Random unit directions for two types at every layer, with large projections so that steering shows."""
    config = _base().config
    layers, hidden = config.num_hidden_layers, config.hidden_size
    g = torch.Generator().manual_seed(11)

    def direction(c: float, norm: float, layer: int, weight: float) -> Direction:
        u = torch.nn.functional.normalize(torch.randn(layers, hidden, generator=g), dim=-1)
        return Direction(u, torch.full((layers,), norm), torch.full((layers,), c), layer, weight)

    directions = {TITLE: direction(8.0, 4.0, 1, 2.0), COMMA: direction(-6.0, 3.0, 0, 1.5)}
    SteeringSet(MODEL, directions, boost=FILE_BOOST).save(path)


@pytest.fixture(scope="module")
def steer_path(tmp_path_factory):
    resolve(MODEL)  # build the zoo model once, here, so the server and the test load the same files
    path = tmp_path_factory.mktemp("steer") / "steer.safetensors"
    _steering_file(path)
    return path


@pytest.fixture(scope="module")
def server(steer_path):
    with served(MODEL, "--steer", str(steer_path), "--dtype", "float32", "--batch-size", "4") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server, api_key="EMPTY", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def vectors(steer_path):
    return SteeringSet.load(steer_path)


@pytest.fixture(scope="module")
def engine():
    return Engine(_base(), load_tokenizer(MODEL), batch_size=8)


def _intervention(vectors, steer: dict[str, float | None], mode: str = "adjust", boost: float = 1.0) -> Intervention:
    return Intervention(tuple(vectors.steering(name, mode=mode, weight=w) for name, w in steer.items()), boost)


def _want(engine, prompts, intervention=None, instruction=None, *, chat=True):
    instructions = [instruction] * len(prompts) if instruction is not None else None
    params = SamplingParams(max_new_tokens=TOKENS)
    out = engine.generate(prompts, params, progress=False, apply_chat_template=chat, intervention=intervention, instructions=instructions)
    return [c[0] for c in out]


def _shown(engine, c) -> list[str]:
    """The tokens a response's log-probs show: the completion's, without a final end token."""
    ids = c.token_ids[:-1] if c.finish_reason in ("eos", "stop") else c.token_ids
    return [engine.tokenizer.decode([t]) for t in ids]


def _chat(client, messages, **extra):
    kw = {k: extra.pop(k) for k in ("stream", "logprobs") if k in extra}
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=TOKENS, temperature=0, extra_body=extra, **kw)


STEER = {TITLE: 1.0, COMMA: 0.5}


def test_steered_chat_equals_the_engine_token_for_token(client, engine, vectors):
    intervention = _intervention(vectors, STEER)
    want = _want(engine, CHATS, intervention)
    plain = _want(engine, CHATS)
    for messages, c, p in zip(CHATS, want, plain):
        r = _chat(client, messages, steer=STEER, logprobs=True)
        assert r.choices[0].message.content == c.text
        assert [t.token for t in r.choices[0].logprobs.content] == _shown(engine, c)
        assert c.token_ids != p.token_ids, "the steering should change the greedy tokens"
        assert _chat(client, messages).choices[0].message.content == p.text  # and a plain request stays plain
    # steer_mode add (weights in units of the fit's mean difference); null: the file's chosen weight
    add = {TITLE: None, COMMA: 2.0}
    (c,) = _want(engine, CHATS[:1], _intervention(vectors, add, "add"))
    assert _chat(client, CHATS[0], steer=add, steer_mode="add").choices[0].message.content == c.text
    assert c.text != want[0].text and c.text != plain[0].text


@pytest.mark.parametrize("instaboost", [True, 3.0])
def test_steering_with_instaboost_equals_the_engine(client, engine, vectors, instaboost):
    """``instaboost: true`` is the file's factor; the instruction's tokens are found in the rendered chat."""
    boost = FILE_BOOST if instaboost is True else instaboost
    steered = _want(engine, CHATS, _intervention(vectors, STEER))
    want = _want(engine, CHATS, _intervention(vectors, STEER, boost=boost), INSTRUCTION)
    for messages, c, s in zip(CHATS, want, steered):
        r = _chat(client, messages, steer=STEER, instaboost=instaboost, instruction=INSTRUCTION, logprobs=True)
        assert r.choices[0].message.content == c.text
        assert [t.token for t in r.choices[0].logprobs.content] == _shown(engine, c)
        assert c.token_ids != s.token_ids, "the boost should change the steered tokens"


def test_completions_endpoint_steers_raw_text(client, engine, vectors):
    (plain,) = _want(engine, [TEXT], chat=False)
    (c,) = _want(engine, [TEXT], _intervention(vectors, {TITLE: 1.5}, "add", boost=4.0), INSTRUCTION, chat=False)
    body = {"steer": {TITLE: 1.5}, "steer_mode": "add", "instaboost": 4, "instruction": INSTRUCTION}
    r = client.completions.create(model=MODEL, prompt=TEXT, max_tokens=TOKENS, temperature=0, logprobs=0, extra_body=body)
    assert r.choices[0].text == c.text and c.token_ids != plain.token_ids
    assert r.choices[0].logprobs.tokens == _shown(engine, c)
    # two text prompts in one request: each gets its own instruction span
    other = f"{INSTRUCTION} Hello"
    two = client.completions.create(model=MODEL, prompt=[TEXT, other], max_tokens=TOKENS, temperature=0, extra_body=body)
    both = _want(engine, [TEXT, other], _intervention(vectors, {TITLE: 1.5}, "add", boost=4.0), INSTRUCTION, chat=False)
    assert [ch.text for ch in two.choices] == [w.text for w in both]


def test_streaming_with_steer_gives_the_whole_text(client):
    for extra in ({"steer": STEER}, {"steer": STEER, "instaboost": True, "instruction": INSTRUCTION}):
        whole = _chat(client, CHATS[0], **extra).choices[0].message.content
        parts = [e.choices[0].delta.content or "" for e in _chat(client, CHATS[0], stream=True, **extra) if e.choices]
        assert "".join(parts) == whole
    body = {"steer": {COMMA: 1.0}, "instaboost": 2.5, "instruction": INSTRUCTION}
    whole = client.completions.create(model=MODEL, prompt=TEXT, max_tokens=TOKENS, temperature=0, extra_body=body).choices[0].text
    stream = client.completions.create(model=MODEL, prompt=TEXT, max_tokens=TOKENS, temperature=0, extra_body=body, stream=True)
    assert "".join(e.choices[0].text for e in stream if e.choices) == whole


def test_concurrent_requests_keep_their_own_interventions(client, engine, vectors):
    """Plain, steered, boosted and both, sent at once to a batch of 4: each gets the engine's tokens for its own."""
    cases = [
        ({}, None, None),
        ({"steer": STEER}, _intervention(vectors, STEER), None),
        ({"instaboost": 6, "instruction": INSTRUCTION}, Intervention(boost=6.0), INSTRUCTION),
        ({"steer": {COMMA: 1.0}, "instaboost": True, "instruction": INSTRUCTION}, _intervention(vectors, {COMMA: 1.0}, boost=FILE_BOOST), INSTRUCTION),
    ]
    want = [[c.text for c in _want(engine, CHATS, iv, inst)] for _, iv, inst in cases]
    got = [[None] * len(CHATS) for _ in cases]

    def ask(k, i):
        got[k][i] = _chat(client, CHATS[i], **cases[k][0]).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(k, i)) for k in range(len(cases)) for i in range(len(CHATS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == want
    assert len({tuple(w) for w in want}) == len(cases)


def _error(call):
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value.status_code, info.value.body


@pytest.mark.parametrize(
    ("extra", "param", "says"),
    [
        ({"steer": {"no:such_type": 1.0}}, "steer", f"{TITLE}, {COMMA}"),  # lists the file's types
        ({"steer": [TITLE]}, "steer", "object mapping"),
        ({"steer": {TITLE: "strong"}}, "steer", "must be a number"),
        ({"steer": STEER, "steer_mode": "push"}, "steer_mode", "add, adjust"),
        ({"instaboost": 0.5, "instruction": INSTRUCTION}, "instaboost", ">= 1"),
        ({"instaboost": "3", "instruction": INSTRUCTION}, "instaboost", "must be a number"),
        ({"instaboost": 3}, "instruction", "instaboost needs instruction"),
        ({"instaboost": True, "instruction": "Speak French."}, "instruction", "not in the prompt"),
        ({"instaboost": 3, "instruction": 7}, "instruction", "must be a string"),
    ],
)
def test_bad_fields_are_400s_naming_them(client, extra, param, says):
    status, body = _error(lambda: _chat(client, CHATS[0], **extra))
    assert status == 400 and body["param"] == param and body["type"] == "invalid_request_error", body
    assert says in body["message"], body["message"]


def test_completions_refuse_instaboost_on_token_ids_and_a_missing_instruction(client, engine):
    ids = engine.prompts.encode([TEXT], apply_chat_template=False)[0]
    body = {"instaboost": 3, "instruction": INSTRUCTION}
    status, err = _error(lambda: client.completions.create(model=MODEL, prompt=ids, max_tokens=4, extra_body=body))
    assert status == 400 and err["param"] == "instaboost"
    status, err = _error(lambda: client.completions.create(model=MODEL, prompt=[TEXT, "Hello"], max_tokens=4, extra_body=body))
    assert status == 400 and err["param"] == "instruction" and "prompt 1" in err["message"]
    status, err = _error(lambda: client.completions.create(model=MODEL, prompt=TEXT, max_tokens=4, extra_body={"steer": {"x": 1}}))
    assert status == 400 and err["param"] == "steer"
    # steering alone works on token ids, and the server is still up
    assert client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0, extra_body={"steer": STEER}).choices[0].text is not None


def test_a_server_without_a_steering_file_refuses_steer_but_boosts(engine):
    with served(MODEL, "--dtype", "float32", "--batch-size", "2") as url:
        client = OpenAI(base_url=url, api_key="EMPTY", max_retries=0, timeout=120)
        status, body = _error(lambda: _chat(client, CHATS[0], steer={TITLE: 1.0}))
        assert status == 400 and body["param"] == "steer" and "--steer" in body["message"]
        status, body = _error(lambda: _chat(client, CHATS[0], instaboost=True, instruction=INSTRUCTION))
        assert status == 400 and body["param"] == "instaboost"
        # a number needs no file
        (c,) = _want(engine, CHATS[:1], Intervention(boost=6.0), INSTRUCTION)
        assert _chat(client, CHATS[0], instaboost=6, instruction=INSTRUCTION).choices[0].message.content == c.text


def test_serve_refuses_a_steering_file_for_another_model(tmp_path):
    from typer.testing import CliRunner

    from posttrain.cli import app

    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=-1)
    SteeringSet("other", {TITLE: Direction(u, torch.ones(3), torch.ones(3), 1, 1.0)}).save(tmp_path / "other.safetensors")
    result = CliRunner().invoke(app, ["serve", MODEL, "--dtype", "float32", "--steer", str(tmp_path / "other.safetensors")])
    assert result.exit_code == 1 and "another model" in result.output
