"""The per-stage table printed after a run."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from .metrics import RunResult, StageStats

__all__ = ["render_table", "stats_table"]


def stats_table(stats: list[StageStats], title: str = "conveyor run") -> Table:
    """A rich Table with one row per stage."""
    table = Table(title=title, title_justify="left")
    for column in (
        "stage",
        "kind",
        "runtime",
        "workers",
        "in",
        "out",
        "filtered",
        "failed",
        "retried",
        "busy %",
        "queue",
        "items/s",
    ):
        table.add_column(
            column, justify="left" if column in ("stage", "kind", "runtime") else "right"
        )
    for s in stats:
        table.add_row(
            s.name,
            s.kind,
            s.runtime,
            str(s.workers),
            f"{s.items_in:,}",
            f"{s.items_out:,}",
            f"{s.filtered:,}",
            f"{s.failed:,}",
            f"{s.retried:,}",
            f"{s.utilisation:.0%}",
            f"{s.queue_size}/{s.queue_capacity}",
            f"{s.throughput:,.0f}",
        )
    return table


def render_table(result: RunResult) -> str:
    """The run's table, its totals and its failures, as plain text."""
    console = Console(width=120, record=True, file=io.StringIO(), color_system=None)
    console.print(stats_table(result.stats))
    console.print(
        f"{result.items_out:,} outputs in {result.elapsed_seconds:.2f} s; "
        f"{len(result.failures)} items failed"
    )
    for f in result.failures[:10]:
        console.print(f"  {f.stage}: {f.item!r:.60} -> {type(f.error).__name__}: {f.error}")
    return console.export_text()
