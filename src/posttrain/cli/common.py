"""What every `posttrain` command shares: the consoles, turning people's errors into messages, shared options."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

out = Console()
err = Console(stderr=True)

VerifiersOpt = Annotated[
    Optional[list[Path]],
    typer.Option("--verifiers", help="A verifier library (JSONL of code verifiers, as `posttrain synth autoif` writes): prompts may name its ids. Repeatable."),
]
UnsafeOpt = Annotated[
    bool,
    typer.Option("--unsafe-exec", help="Run model-written code WITHOUT isolation where no sandbox works (bubblewrap or user namespaces). Never with code you have not read."),
]
TemplateOpt = Annotated[Optional[str], typer.Option("--template", help="Chat template: the tokenizer's own [default], a built-in name (chatml, alpaca) or a .jinja file.")]


def use_verifiers(libraries: list[Path] | None, unsafe_exec: bool = False) -> None:
    """Register the code verifiers of ``libraries`` (their sandbox starts on first use); errors become messages."""
    if not libraries:
        return
    from posttrain.verify import code

    code.configure(unsafe_exec=unsafe_exec)
    try:
        code.load_libraries(libraries)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))


def fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors people cause (bad data, bad paths, bad templates) into messages, not tracebacks."""
    from posttrain.data.chat import TemplateError
    from posttrain.data.convert import ConvertError
    from posttrain.data.formats import DataError

    try:
        yield
    except (DataError, TemplateError, ConvertError, FileNotFoundError, ValueError) as e:
        fail(str(e))
