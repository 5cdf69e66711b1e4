"""Reports of a run: a self-contained HTML page, and the per-stage table as text.

The HTML page needs nothing but a browser: its charts are SVG drawn here,
its style is inline, and it loads no script or font from anywhere. It shows
per-stage throughput and input-queue fill over time (from the run's
`Timeline`), where each stage's worker time went, the bottleneck with its
evidence, the per-stage table, and the errors.

The text table is `RunResult.report()`, so it is written in
`conveyor.metrics`, next to the result (this module depends on metrics,
never the reverse); it is re-exported here with its helpers.
"""

from __future__ import annotations

import html
import json
import logging
import math
import traceback
from collections.abc import Sequence
from datetime import datetime
from os import PathLike
from pathlib import Path

from .metrics import (
    Bottleneck,
    RunResult,
    StageStats,
    bottleneck_line,
    format_seconds,
    more_failures_line,
    printable,
    render_table,
    report_table,
    stage_rows,
)
from .stage import error_text, item_repr

__all__ = [
    "bottleneck_line",
    "check_report_path",
    "format_seconds",
    "render_html",
    "render_table",
    "report_table",
    "stage_rows",
    "write_html",
    "write_report",
]

log = logging.getLogger("conveyor")

# ---------------------------------------------------------------------- HTML

_COLOURS = (
    "#2563eb",
    "#dc2626",
    "#16a34a",
    "#d97706",
    "#7c3aed",
    "#0891b2",
    "#db2777",
    "#4d7c0f",
    "#9a3412",
    "#475569",
)
_FAILURES_SHOWN = 200  # items given up on listed in the HTML report (all are in its JSON)
_CHART_W, _CHART_H = 820, 270
_PAD_L, _PAD_R, _PAD_T, _PAD_B = 64, 170, 16, 40


def check_report_path(path: str | PathLike[str], method: str = "run()") -> Path:
    """Return ``path`` as a Path if a report can be written there; else raise.

    Checked before a run starts, so a typo does not cost a whole run.

    Raises:
        ConfigurationTypeError: ``path`` is not a str or path-like.
        ConfigurationError: the directory does not exist (or is a file), the path
            is a directory, or the file cannot be written there (tried: opened
            for appending, and removed again if it was not there).
    """
    from .errors import ConfigurationError, ConfigurationTypeError

    if not isinstance(path, (str, PathLike)):
        raise ConfigurationTypeError(
            f"{method} 'report' must be a file path, got {type(path).__name__}"
        )
    p = Path(path)
    if p.is_dir():
        raise ConfigurationError(f"{method} 'report' must be a file path, got the directory {p}")
    if p.parent.exists() and not p.parent.is_dir():
        raise ConfigurationError(f"{method} 'report': {p.parent} is a file, not a directory")
    if not p.parent.is_dir():
        raise ConfigurationError(f"{method} 'report': the directory {p.parent} does not exist")
    existed = p.exists()
    try:
        with p.open("a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise ConfigurationError(
            f"{method} 'report': {p} cannot be written: {exc.strerror or exc}"
        ) from exc
    if not existed:
        p.unlink(missing_ok=True)
    return p


def write_html(path: str | Path, result: RunResult, error: BaseException | None = None) -> None:
    """Write the HTML report of ``result`` (and the run's ``error``, if any) to ``path``."""
    Path(path).write_text(printable(render_html(result, error)), encoding="utf-8")


def write_report(path: Path, result: RunResult, error: BaseException | None, ended: bool) -> None:
    """Write the HTML report at the end of a run (`write_html`).

    When the run ``ended`` early (failed, aborted or stopped), a report that
    cannot be written is logged rather than raised: the run's own outcome
    reaches the caller, not the report's.
    """
    try:
        write_html(path, result, error)
    except OSError:
        if not ended:
            raise
        log.exception("conveyor: could not write the report to %s", path)


def render_html(result: RunResult, error: BaseException | None = None) -> str:
    """The self-contained HTML report of a run."""
    names = [s.name for s in result.stats]
    timeline = result.timeline
    if timeline is not None and len(timeline.samples) >= 2:
        rates = [(n, timeline.rates(i)) for i, n in enumerate(names)]
        fills = [(n, [(t, 100 * f) for t, f in timeline.fills(i)]) for i, n in enumerate(names)]
        charts = _section(
            "Throughput per stage",
            _line_chart(rates, "items/s"),
            "Inputs each stage took per second, between consecutive samples.",
        ) + _section(
            "Input queue fill per stage",
            _line_chart(fills, "% full", y_max=100.0),
            "A queue that stays full is waiting for the stage behind it; "
            "an empty one, for the stages before it.",
        )
    else:
        charts = _section("Over time", "<p>The run was too short to sample.</p>", "")
    body = "".join(
        [
            _header(result, error),
            _bottleneck_box(result.bottleneck),
            charts,
            _section(
                "Where the workers' time went",
                _time_bars(result.stats),
                "Share of each stage's worker time: in the stage function, waiting for "
                "input, blocked on a full output; the rest is time before a worker's first "
                "item and after its last.",
            ),
            _section("Stages", _stage_table(result.stats), ""),
            _errors(result, error),
        ]
    )
    # No "<" at all in the data block: "</script>" would end it, and "<!--<script>"
    # would keep its own end tag from ending it (the double-escaped state).
    data = json.dumps(result.as_dict()).replace("<", "\\u003c")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>conveyor run report</title><style>{_CSS}</style></head>"
        f"<body><main>{body}</main>"
        f"<script type='application/json' id='conveyor-data'>{data}</script>"
        "</body></html>\n"
    )


_CSS = """
body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:#1e293b;
background:#f8fafc;margin:0}
main{max-width:1040px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:0 0 8px}
section{background:#fff;border:1px solid #e2e8f0;border-radius:8px;padding:16px 20px;
margin:16px 0}
.muted{color:#64748b;font-size:13px;margin:4px 0 0}
.summary{display:flex;gap:28px;flex-wrap:wrap;margin-top:12px}
.summary div b{display:block;font-size:22px}
.ok{color:#15803d}.bad{color:#b91c1c}.warn{color:#b45309}
.bottleneck{border-left:6px solid #d97706;background:#fffbeb}
.bottleneck.none{border-left-color:#94a3b8;background:#fff}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{padding:4px 8px;border-bottom:1px solid #e2e8f0;text-align:right;white-space:nowrap}
th:first-child,td:first-child,th:nth-child(2),td:nth-child(2){text-align:left}
table.list th,table.list td{text-align:left;white-space:normal}
pre{background:#0f172a;color:#e2e8f0;padding:12px;border-radius:6px;overflow:auto;font-size:12px}
svg text{font-family:inherit}
"""


def _section(title: str, content: str, note: str, css_class: str = "") -> str:
    cls = f" class='{css_class}'" if css_class else ""
    note_html = f"<p class='muted'>{html.escape(note)}</p>" if note else ""
    return f"<section{cls}><h2>{html.escape(title)}</h2>{content}{note_html}</section>"


def _header(result: RunResult, error: BaseException | None) -> str:
    if error is not None:
        status = f"<b class='bad'>failed: {html.escape(type(error).__name__)}</b>"
    elif result.stopped:
        status = "<b class='warn'>stopped before the end</b>"
    else:
        status = "<b class='ok'>finished</b>"
    items_in = result.stats[0].items_in if result.stats else 0
    # As the text report's totals: what the stages' failed column counts, and why.
    counts = result.failed_counts()
    became = ", ".join(f"{n:,} {what}" for what, n in counts.items() if n)
    cells = [
        ("status", status),
        ("wall time", f"<b>{html.escape(format_seconds(result.elapsed_seconds))}</b>"),
        ("items in", f"<b>{items_in:,}</b>"),
        ("outputs", f"<b>{result.items_out:,}</b>"),
        (
            f"failed items ({became})" if became else "failed items",
            f"<b>{sum(counts.values()):,}</b>",
        ),
        ("stages", f"<b>{len(result.stats)}</b>"),
    ]
    summary = "".join(f"<div>{value}{html.escape(label)}</div>" for label, value in cells)
    when = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    flow = " → ".join(html.escape(s.name) for s in result.stats)
    return (
        f"<section><h1>conveyor run report</h1><p class='muted'>{when} · source → {flow}</p>"
        f"<div class='summary'>{summary}</div></section>"
    )


def _bottleneck_box(bottleneck: Bottleneck | None) -> str:
    if bottleneck is None:
        return _section(
            "Bottleneck",
            "<p>None clear: no stage was busy at least half the time with its output free.</p>",
            "",
            "bottleneck none",
        )
    content = (
        f"<p><b>{html.escape(bottleneck.evidence)}</b></p>"
        f"<p>Hint: {html.escape(bottleneck.hint)}.</p>"
    )
    return _section("Bottleneck", content, "", "bottleneck")


def _stage_table(stats: Sequence[StageStats]) -> str:
    headers, rows = stage_rows(stats)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _errors(result: RunResult, error: BaseException | None) -> str:
    parts = []
    if error is not None:
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        parts.append(
            f"<p class='bad'><b>The run failed:</b> {html.escape(error_text(error))}</p>"
            f"<pre>{html.escape(text)}</pre>"
        )
    if result.failures:
        rows = "".join(
            f"<tr><td>{html.escape(f.stage)}</td><td>{html.escape(item_repr(f.item))}</td>"
            f"<td>{html.escape(error_text(f.error, 200))}</td>"
            f"<td>{f.attempts}</td></tr>"
            for f in result.failures[:_FAILURES_SHOWN]
        )
        parts.append(
            "<p>Items given up on (<code>on_error='skip'</code>):</p><table class='list'>"
            "<thead><tr><th>stage</th><th>item</th><th>error</th><th>attempts</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>"
        )
        more = more_failures_line(result, _FAILURES_SHOWN)
        if more:
            parts.append(f"<p class='muted'>{html.escape(more)}</p>")
    if not parts:
        parts.append("<p class='ok'>No errors.</p>")
    return _section("Errors", "".join(parts), "")


# ---------------------------------------------------------------------- SVG charts


def _nice_max(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten that is >= value."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        if step * power >= value:
            return step * power
    return 10 * power


def _fmt_tick(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:g}M"
    if value >= 1e3:
        return f"{value / 1e3:g}k"
    return f"{value:g}"


def _line_chart(
    series: Sequence[tuple[str, Sequence[tuple[float, float]]]],
    y_label: str,
    y_max: float | None = None,
) -> str:
    """An SVG line chart, one line per named series of (seconds, value) points."""
    points = [p for _, pts in series for p in pts]
    x_max = _nice_max(max((t for t, _ in points), default=1.0))
    top = y_max if y_max is not None else _nice_max(max((v for _, v in points), default=1.0))
    plot_w = _CHART_W - _PAD_L - _PAD_R
    plot_h = _CHART_H - _PAD_T - _PAD_B

    def x(t: float) -> float:
        return _PAD_L + plot_w * t / x_max

    def y(v: float) -> float:
        return _PAD_T + plot_h * (1 - min(v, top) / top)

    out = [
        f"<svg class='chart' xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {_CHART_W} "
        f"{_CHART_H}' width='100%' role='img' aria-label='{html.escape(y_label)} over time'>"
    ]
    for k in range(5):
        value = top * k / 4
        yy = y(value)
        out.append(
            f"<line x1='{_PAD_L}' x2='{_PAD_L + plot_w}' y1='{yy:.1f}' y2='{yy:.1f}' "
            f"stroke='#e2e8f0'/><text x='{_PAD_L - 6}' y='{yy + 4:.1f}' font-size='11' "
            f"text-anchor='end' fill='#64748b'>{_fmt_tick(value)}</text>"
        )
        t = x_max * k / 4
        out.append(
            f"<text x='{x(t):.1f}' y='{_PAD_T + plot_h + 16}' font-size='11' "
            f"text-anchor='middle' fill='#64748b'>{_fmt_tick(t)} s</text>"
        )
    out.append(
        f"<text x='14' y='{_PAD_T + plot_h / 2:.0f}' font-size='11' fill='#64748b' "
        f"transform='rotate(-90 14 {_PAD_T + plot_h / 2:.0f})' text-anchor='middle'>"
        f"{html.escape(y_label)}</text>"
        f"<text x='{_PAD_L + plot_w / 2:.0f}' y='{_CHART_H - 4}' font-size='11' fill='#64748b' "
        "text-anchor='middle'>time since start</text>"
    )
    for n, (name, pts) in enumerate(series):
        colour = _COLOURS[n % len(_COLOURS)]
        label = html.escape(name)
        coords = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in pts)
        if len(pts) >= 2:
            out.append(
                f"<polyline fill='none' stroke='{colour}' stroke-width='2' "
                f"stroke-linejoin='round' points='{coords}'><title>{label}</title></polyline>"
            )
        elif pts:
            out.append(
                f"<circle cx='{x(pts[0][0]):.1f}' cy='{y(pts[0][1]):.1f}' r='3' "
                f"fill='{colour}'><title>{label}</title></circle>"
            )
        ly = _PAD_T + 14 + 18 * n
        lx = _PAD_L + plot_w + 16
        out.append(
            f"<rect x='{lx}' y='{ly - 9}' width='12' height='12' rx='2' fill='{colour}'/>"
            f"<text x='{lx + 18}' y='{ly + 1}' font-size='12'>{label}</text>"
        )
    out.append("</svg>")
    return "".join(out)


def _time_bars(stats: Sequence[StageStats]) -> str:
    """An SVG of stacked horizontal bars: busy, waiting for input, blocked, per stage."""
    parts = (("busy", "#2563eb"), ("waiting for input", "#94a3b8"), ("blocked", "#dc2626"))
    row_h, label_w, bar_w = 28, 150, 560
    height = 30 + row_h * len(stats)
    out = [
        f"<svg class='chart' xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {_CHART_W} "
        f"{height}' width='100%' role='img' aria-label='where the workers time went'>"
    ]
    for n, (label, colour) in enumerate(parts):
        lx = label_w + 170 * n
        out.append(
            f"<rect x='{lx}' y='4' width='12' height='12' rx='2' fill='{colour}'/>"
            f"<text x='{lx + 18}' y='14' font-size='12'>{label}</text>"
        )
    for row, s in enumerate(stats):
        top = 28 + row_h * row
        out.append(
            f"<text x='{label_w - 8}' y='{top + 15}' font-size='12' text-anchor='end'>"
            f"{html.escape(s.name)}</text>"
            f"<rect x='{label_w}' y='{top}' width='{bar_w}' height='20' fill='#f1f5f9'/>"
        )
        left = float(label_w)
        for (label, colour), measured in zip(
            parts, (s.utilisation, s.waiting_input, s.blocked_output), strict=True
        ):
            share = measured or 0.0  # None: not measured (Redis), no bar
            width = bar_w * max(0.0, min(share, 1.0))
            if width >= 0.5:
                out.append(
                    f"<rect x='{left:.1f}' y='{top}' width='{width:.1f}' height='20' "
                    f"fill='{colour}'><title>{html.escape(s.name)}: {label} "
                    f"{share:.0%}</title></rect>"
                )
            left += width
        out.append(
            f"<text x='{label_w + bar_w + 8}' y='{top + 15}' font-size='12' fill='#334155'>"
            f"{s.utilisation:.0%} busy</text>"
        )
    out.append("</svg>")
    return "".join(out)
