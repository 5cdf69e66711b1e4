"""Start-up stays light: heavy modules load only when what needs them is used.

Each check runs a fresh interpreter (the test process has imported everything
already) and reads its ``sys.modules``: a structural test, not a timing one.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import conveyor

pytestmark = pytest.mark.quick

HEAVY = ("asyncio", "rich", "redis", "cloudpickle", "msgpack", "click", "prometheus_client")


def loaded_after(code: str) -> set[str]:
    """The top-level packages among `HEAVY` that a fresh interpreter holds after ``code``."""
    probe = (
        f"{code}\nimport json, sys\n"
        f"print(json.dumps(sorted({{m.partition('.')[0] for m in sys.modules}})))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True, timeout=60
    )
    return set(json.loads(proc.stdout.splitlines()[-1])) & set(HEAVY)


def test_import_conveyor_loads_none_of_the_heavy_modules() -> None:
    assert loaded_after("import conveyor") == set()


def test_a_thread_pipeline_runs_without_asyncio_rich_or_the_extras() -> None:
    code = (
        "import conveyor as cv\n"
        "p = cv.Pipeline(range(50)).map(lambda x: x + 1, workers=2).filter(bool)\n"
        "r = p.run(collect=True)\n"
        "assert sorted(r.outputs) == list(range(1, 51)), r.outputs"
    )
    assert loaded_after(code) == set()


def test_a_channel_used_from_threads_does_not_load_asyncio() -> None:
    code = (
        "import conveyor as cv\n"
        "c = cv.Channel(4)\n"
        "c.put_many([1, 2]); c.close()\n"
        "assert list(c) == [1, 2]"
    )
    assert loaded_after(code) == set()


def test_the_command_line_loads_click_but_not_asyncio_redis_or_rich() -> None:
    assert loaded_after("import conveyor.cli") == {"click"}


def test_an_async_stage_loads_asyncio_when_it_runs() -> None:
    code = (
        "import conveyor as cv\n"
        "async def double(x):\n"
        "    return 2 * x\n"
        "r = cv.Pipeline(range(5)).map(double, runtime='async').run(collect=True)\n"
        "assert sorted(r.outputs) == [0, 2, 4, 6, 8], r.outputs"
    )
    assert loaded_after(code) == {"asyncio"}


def test_every_lazy_name_resolves_and_is_listed_by_dir() -> None:
    for name in conveyor._LAZY:
        assert getattr(conveyor, name) is not None
    assert set(conveyor.__all__) <= set(dir(conveyor))


def test_an_unknown_name_is_an_attribute_error_naming_it() -> None:
    with pytest.raises(AttributeError, match="'conveyor' has no attribute 'Pipe'"):
        _ = conveyor.Pipe  # type: ignore[attr-defined]
