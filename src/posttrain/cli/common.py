"""What every `posttrain` command shares: the consoles, turning people's errors into messages, shared options."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

out = Console()
err = Console(stderr=True)

TemplateOpt = Annotated[Optional[str], typer.Option("--template", help="Chat template: the tokenizer's own [default], a built-in name (chatml, alpaca) or a .jinja file.")]


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
