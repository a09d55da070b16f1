"""lm-evaluation-harness on posttrain models, offline.

lm-eval (an optional extra: ``pip install 'posttrain[lm-eval]'``) runs its tasks on a model we load
ourselves — a model directory, a zoo or fetched name, or a run's ``final/`` adapter, merged in memory —
through its ``HFLM`` wrapper. Two things make it work without a network: NLTK's Punkt data (which
lm-eval's IFEval task downloads at import) is written from the parameters our verifiers use, and tasks
can read local data files (``--include-path`` with task YAMLs whose ``dataset_path`` is ``json`` and
whose ``dataset_kwargs.data_files`` name local files).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def offline_nltk_data(root: str | Path | None = None) -> Path:
    """Write NLTK's ``punkt_tab`` English model (from :func:`posttrain.verify.text.punkt_parameters`) and point NLTK at it.

    Call before importing lm-eval's IFEval task, so that it finds the data and never tries to download.
    Returns the ``nltk_data`` root.
    """
    from posttrain.verify.text import punkt_parameters

    root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="posttrain-nltk-"))
    params = punkt_parameters()
    directory = root / "tokenizers" / "punkt_tab" / "english"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "collocations.tab").write_text("\n".join("\t".join(pair) for pair in sorted(params.collocations)), encoding="utf-8")
    (directory / "sent_starters.txt").write_text("\n".join(sorted(params.sent_starters)), encoding="utf-8")
    (directory / "abbrev_types.txt").write_text("\n".join(sorted(params.abbrev_types)), encoding="utf-8")
    ortho = "\n".join(f"{word}\t{flags}" for word, flags in sorted(params.ortho_context.items()))
    (directory / "ortho_context.tab").write_text(ortho, encoding="utf-8")
    os.environ["NLTK_DATA"] = str(root)
    import nltk.data

    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return root


def load_for_eval(model: str, *, dtype: str = "float32", device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) for evaluation: a model directory or name, or a run directory / adapter directory (merged)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.models.load import resolve

    path = Path(model)
    if (path / "final").is_dir():  # a run directory: its final model or adapter
        path = path / "final"
    from posttrain.models.wegeft import is_wegeft_dir

    if is_wegeft_dir(path):  # posttrain's own adapter: onto the base its config names
        from posttrain.models.adapters import merged_with

        base_name = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        merged = merged_with(AutoModelForCausalLM.from_pretrained(resolve(base_name), dtype=getattr(torch, dtype)), path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    elif (path / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        merged = AutoPeftModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).merge_and_unload()
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        name = str(path) if path.exists() else resolve(model)
        merged = AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, dtype))
        tokenizer = AutoTokenizer.from_pretrained(name)
    merged.config.use_cache = True
    return merged.to(device).eval(), tokenizer


def run_tasks(
    model: str,
    tasks: list[str],
    *,
    include_path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    apply_chat_template: bool = True,
    dtype: str = "float32",
    device: str = "cpu",
    max_gen_toks: int | None = None,
) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on ``model``; returns lm-eval's results dict (``results[task][metric]``)."""
    offline_nltk_data()
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError("lm-evaluation-harness is not installed: pip install 'posttrain[lm-eval]'") from e
    hf_model, tokenizer = load_for_eval(model, dtype=dtype, device=device)
    lm = HFLM(pretrained=hf_model, tokenizer=tokenizer, batch_size=batch_size, device=device, **({"max_gen_toks": max_gen_toks} if max_gen_toks else {}))
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        apply_chat_template=apply_chat_template,
        log_samples=False,
    )
