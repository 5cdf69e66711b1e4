"""The docs cannot drift from the code: their ```python blocks run here, and the site builds.

Every fenced ```python block of docs/**/*.md is a test. The blocks of one page
run in order in one namespace, like a script read from top to bottom (a test
of a later block first runs the earlier ones it needs). An HTML comment on the
line before a block changes that (docs/contributing-docs.md):

    <!-- test: skip REASON -->   not run; pytest shows the reason
    <!-- test: redis -->         run with ``REDIS_URL`` set to a real server's URL

A block that includes a section of an example (``--8<-- "examples/x.py:name"``)
is not run here (tests/test_examples.py runs the example itself): its test
checks that the section exists and is Python that compiles.

A failing block's traceback names the page and its line in the page.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import conveyor
import conveyor.errors
import conveyor.redis

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```python\b")
INCLUDE = re.compile(r'^--8<-- "(?P<path>[^":]+)(?::(?P<section>[\w-]+))?"$')
MARKER = re.compile(r"^<!--\s*test:\s*(?P<what>skip|redis)\b\s*(?P<reason>.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    """One ```python block of a page."""

    page: Path
    line: int  # of the block's first line of code, 1-based
    code: str
    skip: str | None  # the reason given, when the block must not run
    redis: bool
    include: tuple[str, str | None] | None = None  # (path, section) of a snippet block

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(DOCS)}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    """The ```python blocks of ``page``, with their markers."""
    lines = page.read_text().splitlines()
    found = []
    index = 0
    while index < len(lines):
        if not FENCE.match(lines[index]):
            index += 1
            continue
        start = index + 1
        end = start
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        previous = next((line for line in reversed(lines[:index]) if line.strip()), "")
        marker = MARKER.match(previous.strip())
        skip = None
        include = INCLUDE.match(lines[start].strip()) if start < end else None
        if marker and marker["what"] == "skip":
            skip = marker["reason"] or "marked <!-- test: skip --> without a reason"
        found.append(
            Block(
                page=page,
                line=start + 1,
                code="\n".join(lines[start:end]),
                skip=skip,
                redis=bool(marker and marker["what"] == "redis"),
                include=(include["path"], include["section"]) if include else None,
            )
        )
        index = end + 1
    return found


def all_blocks() -> list[Block]:
    """Every block of every page, in page order."""
    return [block for page in sorted(DOCS.rglob("*.md")) for block in blocks_of(page)]


@dataclass
class _PageState:
    namespace: dict[str, Any] = field(default_factory=dict)
    done: int = 0  # how many of the page's blocks have run


_PAGES: dict[Path, _PageState] = {}


def run_block(block: Block, redis_url: str | None) -> None:
    """Run ``block`` in its page's namespace, after the earlier blocks of the page."""
    state = _PAGES.setdefault(block.page, _PageState({"__name__": "__docs__"}))
    blocks = blocks_of(block.page)
    upto = next(i for i, b in enumerate(blocks) if b.line == block.line)
    if redis_url is not None:
        state.namespace["REDIS_URL"] = redis_url
    for earlier in blocks[state.done : upto + 1]:
        if earlier.skip is None and earlier.include is None:
            # Padding with blank lines makes a traceback point at the page's own line.
            source = "\n" * (earlier.line - 1) + earlier.code
            exec(compile(source, str(earlier.page), "exec"), state.namespace)
        state.done += 1


def check_include(path: str, section: str | None) -> None:
    """The snippet ``path:section`` exists, is one section, and compiles."""
    source = (ROOT / path).read_text()
    if section is not None:
        start, end = f"# --8<-- [start:{section}]", f"# --8<-- [end:{section}]"
        assert source.count(start) == source.count(end) == 1, f"{path} lacks [{section}]"
        source = source[source.index(start) : source.index(end)]
    assert source.strip(), f"{path}:{section} is empty"
    compile(source, f"{path}:{section}", "exec")


BLOCKS = all_blocks()


def test_blocks_are_read_with_their_markers_and_lines(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# A page\n\n```python\nx = 1\n```\n\n<!-- test: skip needs a GPU -->\n"
        "```python\nimport gpu\n```\n<!-- test: redis -->\n\n```python\nuse(REDIS_URL)\n```\n"
        '```sh\nls\n```\n```python\n--8<-- "examples/crawler.py:plain"\n```\n'
    )
    blocks = blocks_of(page)
    assert [(b.line, b.code, b.skip, b.redis, b.include) for b in blocks] == [
        (4, "x = 1", None, False, None),
        (9, "import gpu", "needs a GPU", False, None),
        (14, "use(REDIS_URL)", None, True, None),
        (20, '--8<-- "examples/crawler.py:plain"', None, False, ("examples/crawler.py", "plain")),
    ]


def test_a_failing_block_names_its_page_and_line(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\nok = True\n\nassert not ok\n```\n")
    [block] = blocks_of(page)
    with pytest.raises(AssertionError) as failure:
        run_block(block, None)
    last = failure.traceback[-1]
    assert (Path(str(last.path)), last.lineno + 1) == (page, 6)


def test_the_docs_have_python_blocks_to_run() -> None:
    runnable = [block for block in BLOCKS if block.skip is None and block.include is None]
    assert len(runnable) >= 15, [block.id for block in BLOCKS]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_a_python_block_of_the_docs_runs(block: Block, request: pytest.FixtureRequest) -> None:
    if block.skip is not None:
        pytest.skip(f"{block.id}: {block.skip}")
    if block.include is not None:
        check_include(*block.include)
        return
    page_blocks = blocks_of(block.page)
    needs_redis = any(b.redis for b in page_blocks if b.line <= block.line and b.skip is None)
    redis_url = request.getfixturevalue("redis_server").url if needs_redis else None
    run_block(block, redis_url)


# --------------------------------------------------------------------- the site


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The site, built with ``mkdocs build --strict`` (a warning fails it)."""
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    assert mkdocs is not None, "mkdocs is not installed: pip install -e '.[docs]'"
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    yield out


def public_names(module: Any) -> list[str]:
    """The names a module exports, but its version."""
    names = getattr(module, "__all__", None) or [
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == module.__name__
    ]
    return [name for name in names if name != "__version__"]


LAZY_HOMES = {
    "RedisBackend": ("conveyor.redis", "reference/redis/index.html"),
    "PrometheusExporter": ("conveyor.prometheus", "reference/conveyor/index.html"),
}
"""Names `conveyor` loads on first use, and the module and page that document them."""


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("module", "page"),
    [
        (conveyor, "reference/conveyor/index.html"),
        (conveyor.redis, "reference/redis/index.html"),
        (conveyor.errors, "reference/errors/index.html"),
    ],
    ids=["conveyor", "conveyor.redis", "conveyor.errors"],
)
def test_the_api_reference_documents_every_public_name(site: Path, module: Any, page: str) -> None:
    html = (site / page).read_text()
    missing = []
    for name in public_names(module):
        home, html_of = module.__name__, html
        if module is conveyor and name in LAZY_HOMES:  # loaded on first use: documented at home
            home, home_page = LAZY_HOMES[name]
            html_of = (site / home_page).read_text()
        if f'id="{home}.{name}"' not in html_of:
            missing.append(name)
    assert not missing, f"{page} lacks {missing}"
