"""What survived each stage of a synthesis run, and why the rest did not: counts, reasons, examples; a table and an HTML page.

Every synthesis stage records one :class:`Step`: how many items came in and went out (in its own unit:
instructions, functions, responses...), the count dropped for each reason, and a few examples of what it
kept and what it dropped, with the reason. Nothing is dropped without a counted reason, and a run whose
outputs are empty says which stage emptied them (:meth:`Funnel.emptied_by`).
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

EXAMPLES = 3  # examples kept and dropped shown per stage (per reason for drops)


@dataclass
class Step:
    stage: str
    unit: str
    count_in: int = 0
    count_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    kept_examples: list[str] = field(default_factory=list)
    dropped_examples: list[dict[str, str]] = field(default_factory=list)
    note: str = ""
    seconds: float = 0.0

    def keep(self, example: str) -> None:
        self.count_out += 1
        if len(self.kept_examples) < EXAMPLES:
            self.kept_examples.append(example[:600])

    @contextmanager
    def timed(self) -> Iterator[Step]:
        """Record the seconds the block takes as this step's."""
        started = time.perf_counter()
        try:
            yield self
        finally:
            self.seconds = round(time.perf_counter() - started, 2)

    def drop(self, reason: str, example: str = "") -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if example and sum(e["reason"] == reason for e in self.dropped_examples) < EXAMPLES:
            self.dropped_examples.append({"reason": reason, "example": example[:600]})


@dataclass
class Funnel:
    steps: list[Step] = field(default_factory=list)

    def step(self, stage: str, unit: str, count_in: int = 0) -> Step:
        step = Step(stage, unit, count_in)
        self.steps.append(step)
        return step

    def emptied_by(self) -> Step | None:
        """The first stage that let nothing through, if any."""
        return next((s for s in self.steps if s.count_in > 0 and s.count_out == 0), None)

    def to_dict(self) -> list[dict[str, Any]]:
        return [asdict(s) for s in self.steps]

    @classmethod
    def from_dict(cls, rows: list[dict[str, Any]]) -> Funnel:
        return cls([Step(**row) for row in rows])

    def table(self, title: str) -> Any:
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=title)
        for column, justify in (("stage", "left"), ("in", "right"), ("out", "right"), ("unit", "left"), ("dropped, by reason", "left")):
            table.add_column(column, justify=justify)  # type: ignore[arg-type]
        for s in self.steps:
            reasons = "; ".join(f"{count} {reason}" for reason, count in sorted(s.dropped.items(), key=lambda kv: -kv[1]))
            table.add_row(escape(s.stage), str(s.count_in), str(s.count_out), s.unit, escape(reasons + (f" ({s.note})" if s.note else "")))
        return table

    def write(self, directory: Path, title: str, outputs: dict[str, int]) -> None:
        """``funnel.json`` and ``report.html`` in ``directory``."""
        (directory / "funnel.json").write_text(json.dumps({"title": title, "outputs": outputs, "stages": self.to_dict()}, indent=1))
        (directory / "report.html").write_text(self.html(title, outputs))

    def html(self, title: str, outputs: dict[str, int]) -> str:
        e = html.escape
        rows = []
        width = max((s.count_in for s in self.steps), default=1) or 1
        for s in self.steps:
            reasons = "".join(f"<li>{count} × {e(reason)}</li>" for reason, count in sorted(s.dropped.items(), key=lambda kv: -kv[1]))
            bar = f'<div class="bar"><div class="in" style="width:{100 * s.count_in / width:.1f}%"></div><div class="out" style="width:{100 * s.count_out / width:.1f}%"></div></div>'
            kept = "".join(f"<pre>{e(x)}</pre>" for x in s.kept_examples)
            dropped = "".join(f"<p class=reason>{e(x['reason'])}</p><pre>{e(x['example'])}</pre>" for x in s.dropped_examples)
            rows.append(
                f"<tr><td><b>{e(s.stage)}</b><br><small>{e(s.note)}</small></td><td>{s.count_in}</td><td>{s.count_out}</td><td>{e(s.unit)}</td>"
                f"<td>{bar}<ul>{reasons}</ul></td><td><details><summary>kept ({len(s.kept_examples)})</summary>{kept}</details>"
                f"<details><summary>dropped ({len(s.dropped_examples)})</summary>{dropped}</details></td></tr>"
            )
        empty = self.emptied_by()
        banner = (
            f'<p class="warn">Nothing came out of stage <b>{e(empty.stage)}</b>: {empty.count_in} {e(empty.unit)} went in, all dropped.</p>'
            if empty
            else ""
        )
        outs = ", ".join(f"{e(name)}: {count}" for name, count in outputs.items())
        return f"""<!doctype html><html><head><meta charset="utf-8"><title>{e(title)}</title><style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }} table {{ border-collapse: collapse; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 6px 10px; vertical-align: top; text-align: left; }}
.bar {{ position: relative; width: 220px; height: 12px; background: #f3f3f3; }} .bar div {{ position: absolute; height: 12px; left: 0; top: 0; }}
.in {{ background: #f2c4c4; }} .out {{ background: #4c9a5b; }} pre {{ white-space: pre-wrap; max-width: 60em; background: #fafafa; padding: 4px; }}
.warn {{ color: #a00; font-weight: bold; }} .reason {{ color: #a00; margin: 4px 0 0; }}
</style></head><body><h1>{e(title)}</h1>{banner}<p>Outputs: {outs}</p>
<table><tr><th>stage</th><th>in</th><th>out</th><th>unit</th><th>dropped (bar: in, out)</th><th>examples</th></tr>{"".join(rows)}</table></body></html>"""
