"""Preference pairs from a model's own samples: K responses per prompt, labelled, best against worst.

``posttrain label`` is AutoIF's online DPO labelling (Dong et al., 2024, arXiv 2406.13542, §2.3): sample
K responses per prompt at temperature 0.8 from the model being tuned, check each with the prompt's
verifiers, and pair a response that follows at least half of the instructions (the one that follows
most) with one that follows none. Two departures from the paper, both on the safe side:

* a response's *pass rate* is the share of the prompt's instructions it follows. The chosen response
  is ranked by IFEval's strict verdicts and the rejected one must fail every instruction even under
  IFEval's loose scoring (markdown stripped, first/last line dropped), so no pair hinges on how
  leniently a response is read;
* an empty response never enters a pair (it is not a response a DPO loop can train on).

``max_rejected_pass_rate`` (default 0, the rule above) loosens the rejected side: the least-followed
response may follow up to that share of the instructions, and fewer than the chosen one (the demo uses
0.5: a response that follows both of two instructions against one that follows one).

With a reward model instead of verifiers, the highest-scored response is chosen and the lowest-scored
rejected; prompts whose responses all score the same are skipped. With an LLM judge (RLAIF: Bai et al.,
2022; Lee et al., 2023), the scores are the judge's 1-10 ratings, and a response whose rating cannot be
read is unscored (NaN): it never enters a pair. When the prompts also carry verifiable instructions, the
two signals mix: responses are ranked by the verifiers first (strict, then loose pass rate) and the
judge's rating breaks ties, so a judge never prefers a response that follows fewer instructions. Skipped prompts are counted by
reason in :class:`LabelSummary`: every prompt is either a pair or a counted skip.

Output: one canonical preference record per line, ``{"prompt": [messages], "chosen": [assistant
message], "rejected": [assistant message], "meta": {...}}``. ``meta`` holds every sample's pass rates
(or scores) and which two were paired; :func:`posttrain.data.formats.read_records` ignores it.

With ``reference_logps`` (``posttrain label --reference-logps``), ``meta["reference"]`` also holds the
sampling model's summed log-prob of the chosen and of the rejected response, which the sampler measured
while generating them (:attr:`~posttrain.generate.engine.Completion.logprobs`), with what they are
valid for: the model's weights (:func:`~posttrain.models.load.weights_fingerprint`), the precision, and
the exact tokens (:func:`~posttrain.data.prompts.reference_key` of the prompt's and the response's token ids). ``posttrain dpo``
starting from that model, in that precision, takes them as its reference log-probs for every pair whose
tokens it renders identically, instead of running the reference forward pass over those pairs.

Sampling may run on an OpenAI-compatible endpoint (``posttrain label --base-url URL --model NAME``,
:class:`~posttrain.generate.client.OpenAIEngine`): the samples come from the server, are cached
there request by request (a killed run re-sends only what is missing), and are labelled here. Reference
log-probs are then not recorded: they are only valid measured on the very weights and tokens DPO
trains, which a server cannot vouch for, so ``posttrain dpo`` computes them itself with its local
reference model, as for any pairs without them.

Prompts are read by :func:`posttrain.data.prompts.read_prompts`, IFEval-format prompts with their
verifiers checked.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from posttrain.data.prompts import Prompt, read_prompts, reference_key
from posttrain.records import PromptRecord, Record, write_jsonl
from posttrain.verify.scoring import prefetch, score_response, verifiers_of

#: ``scorer(prompts, responses) -> scores``: one float per (prompt, response) pair, higher is better.
#: A prompt is text or chat messages, as in a preference record. :func:`load_scorer` makes one of a
#: ``posttrain rm`` reward model; any callable of this shape will do.
Scorer = Callable[[list[Any], list[str]], Sequence[float]]

DEFAULT_TEMPERATURE = 0.8  # AutoIF's online DPO sampling temperature
CHOSEN_MIN_PASS_RATE = 0.5  # AutoIF: chosen pass rate >= 0.5, rejected pass rate = 0
REJECTED_MAX_PASS_RATE = 0.0  # AutoIF's: the rejected response follows none (0.5: "one of two" against "both")


# -- labelling ----------------------------------------------------------------------------------


@dataclass
class LabelSummary:
    """What labelling did. ``pairs + sum(skipped.values()) == prompts``.

    Skip reasons: ``no_chosen`` (no response follows at least half of the instructions), ``no_rejected``
    (a chosen one, but none follows at most ``max_rejected_pass_rate`` of the instructions, AutoIF's 0: fails
    every one, and fewer than the chosen one), ``tied`` (reward model or judge: every response
    ranked the same), ``too_few`` (fewer than two distinct non-empty responses), ``unscored`` (fewer than
    two scored ones: the judge's other ratings were unreadable). ``unscored_samples``: responses the scorer
    returned no score for (NaN).
    """

    prompts: int = 0
    samples: int = 0
    empty_samples: int = 0
    unscored_samples: int = 0
    pairs: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    by: str = "verifiers"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pass_rates(record: PromptRecord, response: str) -> tuple[float, float]:
    """(strict, loose) share of ``record``'s instructions that ``response`` follows."""
    score = score_response(record, response)
    n = max(len(score.instructions), 1)
    return sum(i.strict for i in score.instructions) / n, sum(i.loose for i in score.instructions) / n


def pair_by_verifiers(
    prompt: Prompt,
    responses: list[str],
    *,
    min_pass_rate: float = CHOSEN_MIN_PASS_RATE,
    max_rejected_pass_rate: float = REJECTED_MAX_PASS_RATE,
) -> tuple[Record | None, str | None]:
    """(preference record, None), or (None, skip reason): chosen the most-followed (strict) with a rate
    of at least ``min_pass_rate``; rejected the least-followed (loose; the first of equals) if it follows
    at most ``max_rejected_pass_rate`` of the instructions and fewer than the chosen one (strict). With the
    default 0 that is AutoIF's rule, the first response that follows nothing even under loose scoring; 0.5
    also pairs a response that follows both of two instructions against one that follows one."""
    if prompt.verifiable is None:
        raise ValueError("labelling by verifiers needs IFEval-format prompts (instruction_id_list and kwargs)")
    rates = [_pass_rates(prompt.verifiable, r) if r.strip() else (0.0, 0.0) for r in responses]
    usable = [i for i, r in enumerate(responses) if r.strip()]
    if len(usable) < 2:
        return None, "too_few"
    chosen = max(usable, key=lambda i: (rates[i][0], rates[i][1], -i))
    if rates[chosen][0] < min_pass_rate:
        return None, "no_chosen"
    rejected = min(usable, key=lambda i: (rates[i][1], i))
    if rates[rejected][1] > max_rejected_pass_rate or rates[rejected][1] >= rates[chosen][0]:
        return None, "no_rejected"
    meta = {
        "by": "verifiers",
        "key": prompt.record.get("key"),
        "chosen_index": chosen,
        "rejected_index": rejected,
        "chosen_pass_rate": rates[chosen][0],
        "rejected_pass_rate": rates[rejected][1],
        "pass_rates_strict": [r[0] for r in rates],
        "pass_rates_loose": [r[1] for r in rates],
    }
    return _preference(prompt, responses[chosen], responses[rejected], meta), None


def pair_by_scores(
    prompt: Prompt, responses: list[str], scores: Sequence[float], *, by: str = "reward_model", with_verifiers: bool = False
) -> tuple[Record | None, str | None]:
    """(preference record, None), or (None, skip reason): the highest-ranked response against the lowest.

    Ranked by score (NaN: unscored, left out); ``with_verifiers`` (prompts with instructions): by strict
    pass rate, then loose, then score."""
    nonempty = [i for i, r in enumerate(responses) if r.strip()]
    if len({responses[i] for i in nonempty}) < 2:
        return None, "too_few"
    usable = [i for i in nonempty if not math.isnan(scores[i])]
    if len({responses[i] for i in usable}) < 2:
        return None, "unscored"
    rates = [_pass_rates(prompt.verifiable, r) for r in responses] if with_verifiers and prompt.verifiable is not None else None

    def rank(i: int) -> tuple[float, ...]:
        return (rates[i][0], rates[i][1], scores[i]) if rates else (scores[i],)

    chosen = max(usable, key=lambda i: (rank(i), -i))
    rejected = min(usable, key=lambda i: (rank(i), i))
    if rank(chosen) == rank(rejected):
        return None, "tied"
    meta: dict[str, Any] = {"by": by, "chosen_index": chosen, "rejected_index": rejected, "scores": [None if math.isnan(s) else float(s) for s in scores]}
    if rates:
        meta |= {"by": f"verifiers+{by}", "pass_rates_strict": [r[0] for r in rates], "pass_rates_loose": [r[1] for r in rates]}
    return _preference(prompt, responses[chosen], responses[rejected], meta), None


def _preference(prompt: Prompt, chosen: str, rejected: str, meta: dict[str, Any]) -> Record:
    record: Record = {"prompt": prompt.prompt, "chosen": prompt.response_record(chosen), "rejected": prompt.response_record(rejected)}
    if prompt.tools:
        record["tools"] = prompt.tools
    record["meta"] = meta
    return record


def _reference_meta(completions: Sequence[Any], chosen: int, rejected: int, model: str, precision: str) -> dict[str, Any]:
    def side(c: Any) -> dict[str, Any]:
        return {"logp": math.fsum(c.logprobs), "tokens": len(c.token_ids), "key": reference_key(c.prompt_token_ids, c.token_ids)}

    return {"model": model, "precision": precision, "chosen": side(completions[chosen]), "rejected": side(completions[rejected])}


def label_prompts(
    engine: Any,
    prompts: Sequence[Prompt],
    *,
    k: int = 8,
    scorer: Scorer | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    max_new_tokens: int = 512,
    seed: int = 0,
    bf16: bool = False,
    min_pass_rate: float = CHOSEN_MIN_PASS_RATE,
    max_rejected_pass_rate: float = REJECTED_MAX_PASS_RATE,
    progress: bool = True,
    reference_logps: bool = False,
    scored_by: str = "reward_model",
    with_verifiers: bool = False,
) -> tuple[list[Record], LabelSummary]:
    """Sample ``k`` responses per prompt with ``engine`` and pair them: by verifiers, or by ``scorer`` when given.

    ``scored_by`` names the scorer in the records' meta (``reward_model``, ``judge``); ``with_verifiers``
    ranks by the verifiers first, the scores breaking ties, on prompts that have instructions.

    ``engine``: a :class:`~posttrain.generate.engine.Engine`, ``VLLMEngine`` or ``OpenAIEngine``. Returns
    the preference records (prompts order) and the summary. ``reference_logps``: record the sampling
    model's log-probs of each pair's responses in ``meta["reference"]`` (transformers engine only; see the
    module docstring).
    """
    from posttrain.generate.params import SamplingParams

    if k < 2:
        raise ValueError(f"k must be at least 2 (a pair needs two responses), not {k}")
    if scorer is None:
        missing = [i for i, p in enumerate(prompts) if p.verifiable is None]
        if missing:
            raise ValueError(
                f"labelling by verifiers needs IFEval-format prompts; {len(missing)} prompt(s) have no instructions (first: #{missing[0]})"
            )
    fingerprint = precision = ""
    if reference_logps:
        from posttrain.models.load import weights_fingerprint

        model = getattr(engine, "model", None)
        if model is None or not hasattr(model, "parameters"):
            raise ValueError("reference log-probs are recorded by the transformers engine only (this engine has no model to fingerprint)")
        fingerprint = weights_fingerprint(model)
        precision = "bfloat16" if bf16 else str(next(model.parameters()).dtype).removeprefix("torch.")
    params = SamplingParams(n=k, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed, bf16=bf16, logprobs=reference_logps)
    outputs = engine.generate([p.engine_input() for p in prompts], params, progress=progress)
    responses = [[c.text for c in completions] for completions in outputs]
    with_verifiers = with_verifiers and any(p.verifiable is not None for p in prompts)
    if scorer is None or with_verifiers:  # code verifiers judge every sample in one sandbox round trip each
        prefetch((p.verifiable, r) for p, rs in zip(prompts, responses) if p.verifiable is not None for r in rs)
    summary = LabelSummary(by="verifiers" if scorer is None else f"verifiers+{scored_by}" if with_verifiers else scored_by)
    scores: list[Sequence[float]] = []
    if scorer is not None:
        flat = scorer([p.prompt for p, rs in zip(prompts, responses) for _ in rs], [r for rs in responses for r in rs])
        flat = [float(s) for s in flat]
        if len(flat) != sum(len(rs) for rs in responses) or any(math.isinf(s) for s in flat):
            raise ValueError(f"the scorer must return one finite score (or NaN: unscored) per response ({sum(map(len, responses))}); got {len(flat)} values")
        summary.unscored_samples = sum(math.isnan(s) for s in flat)
        scores = [flat[i * k : (i + 1) * k] for i in range(len(prompts))]
    records, skipped = [], Counter()
    for i, (prompt, rs) in enumerate(zip(prompts, responses)):
        summary.prompts += 1
        summary.samples += len(rs)
        summary.empty_samples += sum(not r.strip() for r in rs)
        record, reason = (
            pair_by_verifiers(prompt, rs, min_pass_rate=min_pass_rate, max_rejected_pass_rate=max_rejected_pass_rate)
            if scorer is None
            else pair_by_scores(prompt, rs, scores[i], by=scored_by, with_verifiers=with_verifiers)
        )
        if record is None:
            skipped[reason] += 1
            continue
        if reference_logps:
            meta = record["meta"]
            meta["reference"] = _reference_meta(outputs[i], meta["chosen_index"], meta["rejected_index"], fingerprint, precision)
        records.append(record)
    summary.pairs = len(records)
    summary.skipped = dict(sorted(skipped.items()))
    return records, summary


def load_scorer(reward_model: str | Path, *, device: str | None = None, batch_size: int = 16) -> Scorer:
    """A :data:`Scorer` from a reward model trained by ``posttrain rm`` (its run directory or ``final/``).

    The reward model scores prompt/completion records; each (prompt, response) becomes one, the response
    an assistant message after a chat prompt, as in the preference records it was trained on.
    """
    from posttrain.train.reward import load_reward_model

    model = load_reward_model(reward_model, device=device, batch_size=batch_size)

    def score(prompts: list[Any], responses: list[str]) -> list[float]:
        records = [
            {"prompt": p, "completion": r if isinstance(p, str) else [{"role": "assistant", "content": r}]}
            for p, r in zip(prompts, responses)
        ]
        return model.score(records)

    return score


def label_file(
    model: str,
    data: str | Path,
    output: str | Path,
    *,
    by: str = "verifiers",
    reward_model: str | Path | None = None,
    scorer: Scorer | None = None,
    k: int = 8,
    temperature: float = DEFAULT_TEMPERATURE,
    max_new_tokens: int = 512,
    seed: int = 0,
    format: str | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    bf16: bool = False,
    template: str | None = None,
    device: str | None = None,
    progress: bool = True,
    reference_logps: bool = False,
    base_url: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    concurrency: int = 8,
    cache_dir: str | Path | None = None,
    engine: Any = None,
) -> LabelSummary:
    """``posttrain label``: read prompts, sample ``k`` responses each with ``model``, write preference pairs to ``output``.

    ``by="verifiers"`` needs IFEval-format prompts; ``by="reward-model"`` needs ``reward_model`` (a run
    directory of ``posttrain rm``) or a ``scorer``; ``by="judge"`` a ``scorer`` giving a judge's ratings
    (NaN where unreadable; :func:`posttrain.eval.judge.judge_scorer`), mixed with the verifiers on prompts
    that have instructions. With ``base_url``, ``model`` is the endpoint's name
    for the model and sampling runs there (``concurrency`` requests at a time, the key from the
    environment variable ``api_key_env``, finished requests cached in ``cache_dir``, default
    ``$POSTTRAIN_CACHE/requests``); ``batch_size``, ``bf16``, ``template`` and ``device`` are then the
    server's business, and ``reference_logps`` is refused (see the module docstring). A reward model
    still scores in this process. ``engine``: an engine already loaded for ``model`` (e.g. shared with the judge).
    """
    from posttrain.generate.load import load_engine

    if base_url is not None and reference_logps:
        raise ValueError(
            "--reference-logps records log-probs measured in this process on the weights DPO starts from; with --base-url the "
            "samples come from a server, so leave it off (posttrain dpo then computes the reference log-probs itself)"
        )
    if by not in ("verifiers", "reward-model", "judge"):
        raise ValueError(f"by must be 'verifiers', 'reward-model' or 'judge', not {by!r}")
    if by == "judge" and scorer is None:
        raise ValueError("labelling by judge needs a scorer (posttrain label --judge MODEL builds one)")
    if by == "reward-model" and scorer is None:
        if reward_model is None:
            raise ValueError("labelling by reward model needs --reward-model RUN (a reward model run directory)")
        scorer = load_scorer(reward_model, device=device)
    if by == "verifiers":
        scorer = None
    prompts = read_prompts(data, format=format, validate=verifiers_of)[:limit]
    if not prompts:
        raise ValueError(f"{data}: no prompts to label")
    if engine is not None:
        pass
    elif base_url is not None:
        from posttrain.generate.client import OpenAIEngine

        engine = OpenAIEngine(base_url, model, api_key_env=api_key_env, concurrency=concurrency, cache_dir=cache_dir)
    else:
        engine = load_engine(model, dtype="float32", device=device, batch_size=batch_size, template=template)
    records, summary = label_prompts(
        engine, prompts, k=k, scorer=scorer, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed, bf16=bf16,
        progress=progress, reference_logps=reference_logps, scored_by="judge" if by == "judge" else "reward_model",
        with_verifiers=by == "judge",
    )  # fmt: skip
    write_jsonl(output, records)
    return summary
