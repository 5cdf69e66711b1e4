"""The contract suite: one set of tests that every runtime x backend must pass.

Each test in this directory takes the ``runner`` fixture, parametrised over
{thread, process, async, interpreter} x {local, redis} (ids such as
``thread-local`` or ``async-redis``; the interpreter runtime on Python 3.14+,
skipped with its reason below). The test builds its pipeline with
``runtime=runner.runtime`` and ``runner.fn(f)`` on every stage that has a
runtime, and runs it with ``runner.run`` / ``runner.iterate`` /
``runner.start``:

- local: ``pipeline.run(**kw)``, ``iter(pipeline)``, ``pipeline.start(**kw)``;
- redis: the same with ``backend=RedisBackend(url, namespace=<one per test>,
  local_workers=True)`` on the session's redis-server (``redis_server``).

Where a combination does not meet the contract today (a library bug or a
missing feature), the test stays as the contract says and the combination is
listed in `KNOWN_GAPS` below, the one place where gaps are recorded: the
fixture marks that test x combination ``xfail(strict=True)``, so the suite stays
green, the gap stays visible, and a fix turns it into a failure (XPASS) that
asks for the entry to be removed.

`runners.py` holds the `Runner` and the helpers the tests share.

Stage functions of these tests are module-level or closures of the test, and
the test modules are pickled by value (`cloudpickle.register_pickle_by_value`),
so process workers never import them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from runners import ALL, REDIS_COMBOS, Runner, split_combo, unclosed_resources

# ---------------------------------------------------------------------- known gaps

# (test function name, combination) -> why it fails today. The ONE list of the
# contract's gaps; the fixture below applies it. Each reason says what is wrong.
# A gap is xfail(strict=True): remove its entry when its XPASS says it is closed.
# A race that fails only some runs cannot be strict: it is an `Intermittent`,
# xfail(strict=False) for its exception type only, so other failures still show.


@dataclass(frozen=True)
class Intermittent:
    """A gap that shows in some runs only (a race)."""

    reason: str
    raises: type[BaseException]


_GAPS_ON_REDIS: dict[str, str] = {}  # test -> why, on every runtime with the Redis backend

KNOWN_GAPS: dict[tuple[str, str], str | Intermittent] = {
    **{(test, combo): why for test, why in _GAPS_ON_REDIS.items() for combo in REDIS_COMBOS},
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every contract test of the interpreter runtime is a quick one.

    The runtime exists from Python 3.14, and the Pythons other than the main
    one run only the quick tests (scripts/test.sh): unmarked, the runtime
    would meet a sample of the contract in CI, not the whole of it.
    """
    for item in items:
        callspec = getattr(item, "callspec", None)
        combo = callspec.params.get("runner") if callspec is not None else None
        if isinstance(combo, str) and split_combo(combo)[0] == "interpreter":
            item.add_marker(pytest.mark.quick)


@pytest.fixture(params=ALL)
def runner(request: pytest.FixtureRequest) -> Iterator[Runner]:
    """One runtime x backend combination (see the module docstring)."""
    from redis_helpers import new_namespace

    combo: str = request.param
    runtime, backend = split_combo(combo)
    gap = KNOWN_GAPS.get((request.node.originalname, combo))
    if isinstance(gap, Intermittent):
        request.node.add_marker(
            pytest.mark.xfail(strict=False, raises=gap.raises, reason=f"known race: {gap.reason}")
        )
    elif gap is not None:
        request.node.add_marker(pytest.mark.xfail(strict=True, reason=f"known gap: {gap}"))
    if backend == "redis":
        server = request.getfixturevalue("redis_server")
        r = Runner(runtime, backend, url=server.url, namespace=new_namespace())
    else:
        r = Runner(runtime, backend)
    try:
        yield r
    finally:
        r.close()
    # Once the test's own references are gone: a run must leave nothing open (a
    # thread left behind in user code, released, must not reconnect a closed client).
    unclosed = unclosed_resources()
    assert not unclosed, f"left open: {unclosed}"
