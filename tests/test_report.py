"""Reports: the text table after a run, and the self-contained HTML page.

The HTML is checked structurally here (parsed with html.parser); that it
renders in a browser is checked by hand, as docs/observability.md describes.
"""

from __future__ import annotations

import json
import os
import threading
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import conveyor as cv
from conveyor.metrics import RunResult, StageStats, stage_rows
from conveyor.report import check_report_path, format_seconds, render_html
from test_metrics import slow_middle, stats
from test_pipeline_helpers import must_wait, no_thread_left  # noqa: F401

pytestmark = pytest.mark.usefixtures("no_thread_left")


class Page(HTMLParser):
    """The tags, attributes and visible text of an HTML page."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.visible: list[str] = []
        self.scripts: list[str] = []
        self._inside: list[str] = []
        self.feed(source)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in ("meta", "rect", "line", "circle", "polyline"):
            self._inside.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        if tag in self._inside:
            while self._inside.pop() != tag:
                pass

    def handle_data(self, data: str) -> None:
        if "script" in self._inside:
            self.scripts.append(data)
        elif "style" not in self._inside:
            self.visible.append(data)

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.visible).split())

    def count(self, tag: str) -> int:
        return sum(1 for t, _ in self.tags if t == tag)

    def attributes(self, tag: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == tag]


def flaky_parse(x: int) -> int:
    """Slow work that fails on multiples of 50."""
    if x % 50 == 0:
        raise ValueError(f"bad record {x}")
    return x


# ---------------------------------------------------------------------- text


def test_the_text_report_is_the_table_then_the_totals_and_the_bottleneck() -> None:
    result = slow_middle(100).run()
    report = result.report()
    header = next(line for line in report.splitlines() if "stage" in line)
    for column in ("in", "out", "busy", "starved", "blocked", "p50", "p99", "items/s"):
        assert column in header
    assert "failed" not in header  # counts that are zero everywhere are left out
    assert max(len(line) for line in result.report(width=80).splitlines()) <= 80
    for name in ("read", "parse", "write"):
        assert name in report
    assert "100 outputs in" in report
    assert f"bottleneck: {result.bottleneck}" in " ".join(report.split())


@pytest.mark.parametrize(
    ("width", "error"),
    [
        (0, cv.ConfigurationError),
        (-5, cv.ConfigurationError),
        (39, cv.ConfigurationError),
        ("wide", cv.ConfigurationTypeError),
    ],
)
def test_a_report_narrower_than_it_can_be_drawn_is_refused_naming_width(
    width: Any, error: type[Exception]
) -> None:
    """Regression: width=0 gave an empty report without a word, width=1 one character a
    line, and width="wide" a bare TypeError from the table drawing."""
    result = cv.Pipeline(range(3)).map(abs).run()
    with pytest.raises(error, match=r"RunResult.report\(\) 'width' must be an int >= 40"):
        result.report(width)
    narrowest = result.report(40)  # the columns are cut to fit, the lines are whole
    assert "3 outputs in" in narrowest
    assert max(len(line) for line in narrowest.splitlines()) <= 40


def test_the_text_report_lists_failed_items() -> None:
    p = cv.Pipeline(range(120)).map(flaky_parse, on_error="skip", name="parse")
    report = p.run().report()
    assert "3 items failed (3 skipped)" in report
    header = next(line for line in report.splitlines() if "stage" in line)
    assert "failed" in header and "filtered" not in header
    assert "parse: 50 -> ValueError: bad record 50" in report


def test_a_run_without_a_clear_bottleneck_says_so() -> None:
    report = cv.Pipeline(range(3)).map(lambda x: x, name="tiny").run().report()
    assert "bottleneck: " in report


@pytest.mark.quick
@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0"),
        (3e-7, "300 ns"),
        (3.5e-5, "35 µs"),
        (0.0012, "1.2 ms"),
        (0.0999, "100 ms"),
        (2.1, "2.1 s"),
        (42.0, "42 s"),
        (185, "3m05s"),
        (7300, "2h01m"),
    ],
)
def test_durations_read_in_the_unit_that_fits(seconds: float, text: str) -> None:
    assert format_seconds(seconds) == text


# ---------------------------------------------------------------------- HTML


def test_run_writes_an_html_report_with_charts_the_bottleneck_and_stage_names(
    tmp_path: Path,
) -> None:
    path = tmp_path / "run.html"
    result = slow_middle(150).run(report=path)
    page = Page(path.read_text(encoding="utf-8"))
    assert page.count("svg") == 3  # throughput, queue fill, where the time went
    assert page.count("polyline") >= 3  # a line per stage, at least in one chart
    for name in ("read", "parse", "write"):
        assert name in page.text
    assert result.bottleneck is not None
    assert result.bottleneck.evidence in page.text
    assert f"Hint: {result.bottleneck.hint}." in page.text
    for heading in ("Throughput per stage", "Input queue fill per stage", "Stages", "Errors"):
        assert heading in page.text
    assert "No errors." in page.text


def test_the_html_report_is_self_contained(tmp_path: Path) -> None:
    path = tmp_path / "run.html"
    slow_middle(40).run(report=path)
    source = path.read_text(encoding="utf-8")
    page = Page(source)
    assert page.count("link") == 0 and page.count("img") == 0 and page.count("iframe") == 0
    for _, attrs in page.tags:
        assert "src" not in attrs
        assert not str(attrs.get("href", "")).startswith(("http:", "https:", "//"))
    assert [a.get("type") for a in page.attributes("script")] == ["application/json"]
    assert "@import" not in source and "url(" not in source


def test_the_html_report_embeds_the_metrics_as_json(tmp_path: Path) -> None:
    path = tmp_path / "run.html"
    result = slow_middle(40).run(report=path)
    (data,) = (json.loads(s) for s in Page(path.read_text(encoding="utf-8")).scripts)
    assert [s["name"] for s in data["stages"]] == [s.name for s in result.stats]
    assert data["timeline"]["samples"]


def test_the_html_report_lists_failed_items(tmp_path: Path) -> None:
    path = tmp_path / "run.html"
    cv.Pipeline(range(120)).map(flaky_parse, on_error="skip", name="parse").run(report=path)
    page = Page(path.read_text(encoding="utf-8"))
    assert "Items given up on" in page.text
    assert "ValueError: bad record 100" in page.text


def test_a_failed_run_still_writes_its_report_with_the_error(tmp_path: Path) -> None:
    path = tmp_path / "run.html"
    p = cv.Pipeline(range(120)).map(flaky_parse, name="parse")
    with pytest.raises(ValueError, match="bad record 0"):
        p.run(report=path)
    text = Page(path.read_text(encoding="utf-8")).text
    assert "failed: ValueError" in text
    assert "The run failed: ValueError: bad record 0" in text
    assert "stage 'parse' (map) failed on item 0" in text  # the note, in the traceback


def test_a_stopped_runs_report_says_it_stopped(tmp_path: Path) -> None:
    path = tmp_path / "run.html"
    gate = threading.Event()
    taken = threading.Event()

    def held(x: int) -> int:
        taken.set()
        must_wait(gate)
        return x

    handle = cv.Pipeline(range(10)).map(held, name="held").start(report=path)
    must_wait(taken)
    handle.stop()
    gate.set()
    handle.join(10)
    assert "stopped before the end" in Page(path.read_text(encoding="utf-8")).text


@pytest.mark.quick
def test_a_report_without_samples_still_renders() -> None:
    result = cv.Pipeline(range(5)).map(lambda x: x, name="only").run()
    page = Page(render_html(result))
    assert "The run was too short to sample." in page.text
    assert page.count("svg") == 1 and "only" in page.text


@pytest.mark.quick
@pytest.mark.parametrize(
    ("path", "error", "match"),
    [
        ("{tmp}", cv.ConfigurationError, "must be a file path, got the directory"),
        ("{tmp}/missing/run.html", cv.ConfigurationError, "does not exist"),
        (42, cv.ConfigurationTypeError, "must be a file path, got int"),
        # Not writable, even by root: the run went to its end, then failed writing it.
        pytest.param(
            "/sys/conveyor-report.html",
            cv.ConfigurationError,
            "cannot be written: .*denied",
            marks=pytest.mark.skipif(
                not os.path.ismount("/sys"),
                reason="/sys is no sysfs here (a chroot's plain folder): root may write there",
            ),
        ),
    ],
)
def test_a_bad_report_path_is_refused_before_the_run(
    tmp_path: Path, path: Any, error: type[Exception], match: str
) -> None:
    if isinstance(path, str):
        path = path.format(tmp=tmp_path)
    with pytest.raises(error, match=match):
        check_report_path(path)
    source_pulled = []

    def source() -> Any:
        source_pulled.append(True)
        yield 1

    with pytest.raises(error, match=match):
        cv.Pipeline(source()).map(lambda x: x).run(report=path)
    assert source_pulled == []


@pytest.mark.quick
def test_checking_a_report_path_leaves_no_file_and_keeps_an_existing_one(tmp_path: Path) -> None:
    fresh = tmp_path / "run.html"
    assert check_report_path(fresh) == fresh
    assert not fresh.exists()
    old = tmp_path / "old.html"
    old.write_text("earlier report")
    check_report_path(old)
    assert old.read_text() == "earlier report"


# ---------------------------------------------------------------------- odd names and items


class _UnprintableItem:
    """An item whose repr raises, as a half-built object's may."""

    def __repr__(self) -> str:
        raise RuntimeError("repr broke")


class _UnprintableError(Exception):
    """An exception whose str raises."""

    def __str__(self) -> str:
        raise RuntimeError("str broke")


class _HugeRepr:
    """An item with a repr of a megabyte."""

    def __repr__(self) -> str:
        return "Z" * 1_000_000


def _reject(x: object) -> object:
    raise ValueError(f"rejected {x!r}")


def _reject_unprintably(x: object) -> object:
    raise _UnprintableError


def test_the_text_report_shows_stage_names_with_brackets_as_they_are() -> None:
    names = ["[/]", "[bold]b", "a[red]"]
    p = cv.Pipeline(range(3))
    for name in names:
        p = p.map(lambda x: x, name=name)
    report = p.run().report()
    for name in names:
        assert name in report


def test_the_embedded_metrics_hold_no_markup_whatever_the_stage_names(tmp_path: Path) -> None:
    # The repro: a name holding "<!--<script>" put the HTML parser in the script
    # element's double-escaped state, where the block's own "</script>" does not
    # end it: the data and the rest of the page became one unreadable script.
    path = tmp_path / "run.html"
    name = "<!--<script>x</script>"
    cv.Pipeline(["<!--<script>"]).map(_reject, name=name, on_error="skip").run(report=path)
    source = path.read_text(encoding="utf-8")
    start = source.index("id='conveyor-data'>") + len("id='conveyor-data'>")
    block = source[start : source.index("</script>", start)]
    assert "<" not in block
    data = json.loads(block)
    assert data["stages"][0]["name"] == name
    assert data["failures"][0]["item"] == "'<!--<script>'"


def test_a_report_survives_text_that_is_not_unicode(tmp_path: Path) -> None:
    # A lone surrogate is what os.fsdecode makes of a file name that is not UTF-8.
    path = tmp_path / "run.html"
    name = "read \udcff"
    p = cv.Pipeline([b"\xff", "f\udcfe"]).map(_reject, name=name, on_error="skip")
    result = p.run(report=path)
    page = Page(path.read_text(encoding="utf-8"))
    assert "read \\udcff" in page.text
    assert "ValueError: rejected b'\\xff'" in page.text
    (data,) = (json.loads(s) for s in page.scripts)
    assert data["stages"][0]["name"] == name
    report = result.report()
    table = report.splitlines()[1:4]  # header, rule, the stage's row: escaped before laid out
    assert "read \\udcff" in table[2]
    assert len({len(line.rstrip()) for line in table}) == 1


@pytest.mark.parametrize(
    ("item", "fn", "shown"),
    [
        (_UnprintableItem(), _reject_unprintably, "_UnprintableItem"),
        (1, _reject_unprintably, "_UnprintableError"),
    ],
    ids=["repr-raises", "str-raises"],
)
def test_a_report_survives_items_and_errors_that_cannot_be_shown(
    tmp_path: Path, item: object, fn: Any, shown: str
) -> None:
    path = tmp_path / "run.html"
    result = cv.Pipeline([item]).map(fn, name="check", on_error="skip").run(report=path)
    assert len(result.failures) == 1
    assert shown in Page(path.read_text(encoding="utf-8")).text
    assert shown in result.report()
    assert shown in result.to_json()


def test_failed_items_are_shown_shortened_in_every_report(tmp_path: Path) -> None:
    path = tmp_path / "run.html"
    items = [_HugeRepr() for _ in range(5)]
    result = cv.Pipeline(items).map(_reject, name="check", on_error="skip").run(report=path)
    assert len(result.failures) == 5
    assert path.stat().st_size < 200_000
    assert len(result.to_json()) < 200_000
    for failure in json.loads(result.to_json())["failures"]:
        assert failure["item"].startswith("ZZZ") and len(failure["item"]) < 2_000
        assert failure["error"].startswith("ValueError: rejected ZZZ")
        assert len(failure["error"]) < 2_000


# ---------------------------------------------------------------------- narrow reports

_COUNT = st.integers(min_value=0, max_value=10**12)


@st.composite
def stage_stats(draw: st.DrawFn) -> StageStats:
    return stats(
        draw(st.text("abcdefghij_", min_size=1, max_size=40)),
        kind=draw(st.sampled_from(["map", "filter", "flat_map", "each"])),
        runtime=draw(st.sampled_from(["thread", "process", "async"])),
        workers=draw(st.integers(min_value=1, max_value=100_000)),
        items_in=draw(_COUNT),
        items_out=draw(_COUNT),
        filtered=draw(st.sampled_from([0, 0, 7, 10**9])),
        failed=draw(st.sampled_from([0, 0, 1, 123_456_789])),
        retried=draw(st.sampled_from([0, 0, 3, 10**6])),
        busy_seconds=draw(st.floats(min_value=0, max_value=10)),
        latency_p50=draw(st.floats(min_value=0, max_value=1e4)),
        latency_p99=draw(st.floats(min_value=0, max_value=1e6)),
    )


def _numbers(line: str) -> list[str]:
    return [
        t.rstrip(",")
        for t in line.split()
        if t[0].isdigit() and t.rstrip(",").replace(",", "").isdigit()
    ]


@settings(max_examples=150, deadline=None)
@given(st.lists(stage_stats(), min_size=1, max_size=4), st.integers(min_value=40, max_value=200))
def test_a_report_of_any_width_shows_every_number_it_shows_whole(
    stages: list[StageStats], width: int
) -> None:
    """Regression: report(width=40) showed counts as "3…", and at 80 columns a failed
    column cut the headers to "sta…", "wor…"."""
    text = RunResult(stats=stages).report(width)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width
    assert "…" not in text
    table = lines[: next(i for i, line in enumerate(lines) if " in 0.00 s; " in line)]
    _, rows = stage_rows(stages)
    cells = {cell for row in rows for cell in row[2:]}
    cells |= {cell.split()[0] for cell in cells if " " in cell}  # "500 ms": its number
    for line in table[1:]:
        for number in _numbers(line):
            assert number in cells, (number, line)  # whole: not a piece of one
    shown = set(_numbers(" ".join(table)))
    for s in stages:  # the counts that always stay
        assert {f"{s.items_in:,}", f"{s.items_out:,}"} <= shown
        if any(x.failed for x in stages):
            assert f"{s.failed:,}" in shown


def test_a_narrow_report_shortens_headers_and_leaves_out_timings_before_any_count() -> None:
    stages = [
        stats("parse", items_in=123_456, items_out=120_986, failed=2_470),
        stats("filter", kind="filter", items_in=120_986, items_out=80_658, filtered=40_328),
    ]
    result = RunResult(stats=stages)
    header = result.report(80).splitlines()[1].split()
    assert header[:5] == ["stage", "kind", "wk", "in", "out"]
    assert "p99" not in header and "filt" in header and "fail" in header
    narrowest = result.report(40).splitlines()
    assert narrowest[1].split() == ["stage", "wk", "in", "out", "fail"]
    assert narrowest[3].split() == ["parse", "1", "123,456", "120,986", "2,470"]


def test_where_no_table_fits_each_value_gets_a_line_of_its_own() -> None:
    huge = 10**15
    stages = [stats("a" * 30, items_in=huge, items_out=huge, failed=huge)]
    lines = RunResult(stats=stages).report(40).splitlines()
    assert lines[1:6] == [
        "a" * 30 + " (map)",
        "  workers 1",
        "  in 1,000,000,000,000,000",
        "  out 1,000,000,000,000,000",
        "  failed 1,000,000,000,000,000",
    ]
    assert max(len(line) for line in lines) <= 40


@pytest.mark.parametrize(
    ("failed", "skipped", "error", "said"),
    [
        (0, 0, None, "0 items failed"),
        (1, 1, None, "1 item failed (1 skipped)"),
        (3, 2, ValueError("boom"), "3 items failed (2 skipped, 1 ended the run)"),
        (1, 0, ValueError("boom"), "1 item failed (1 ended the run)"),
    ],
)
def test_the_totals_say_how_many_items_failed_and_what_became_of_them(
    failed: int, skipped: int, error: BaseException | None, said: str
) -> None:
    """Regression: the line counted ``result.failures`` (skipped items) only, under
    the name "failed", and said "1 items"."""
    failures = [cv.Failure("s", n, ValueError(n), 1) for n in range(skipped)]
    result = RunResult(stats=[stats(failed=failed)], failures=failures, items_out=1, error=error)
    assert f"1 output in 0.00 s; {said}" in result.report()


def test_a_run_whose_error_ended_it_counts_that_item_as_failed() -> None:
    p = cv.Pipeline(range(100)).map(flaky_parse, name="parse")  # fails on 0
    handle = p.start()
    with pytest.raises(ValueError, match="bad record 0"):
        handle.join()
    report = handle.result_so_far().report()
    assert "1 item failed (1 ended the run)" in report


@pytest.mark.parametrize("width", [40, 80, 130])
def test_the_report_of_a_run_without_stages_is_the_totals(width: int) -> None:
    text = RunResult(stats=[]).report(width)
    assert "0 outputs in 0.00 s; 0 items failed" in text


def test_the_html_summary_counts_failed_items_as_the_text_report_does() -> None:
    """Regression: its "failed items" were the skipped ones only."""
    failures = [cv.Failure("s", 1, ValueError(1), 1)]
    result = RunResult(stats=[stats(failed=3)], failures=failures, error=ValueError("boom"))
    page = render_html(result)
    assert "<b>3</b>failed items (1 skipped, 2 ended the run)" in page
