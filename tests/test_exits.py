"""Bounded exits outside the contract suite: a stage stuck on a lock, and the
interpreter exiting promptly after Ctrl-C while user code is stuck."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import conveyor as cv

BOUND = 1.0
"""The contract: control is back in the caller within this many seconds."""


@pytest.mark.parametrize("runtime", ["thread", "async"])
def test_a_stage_stuck_on_a_lock_is_left_behind_on_ctrl_c_and_named(runtime: str) -> None:
    lock = threading.Lock()
    lock.acquire()
    entered = threading.Event()

    def locked(x: int) -> int:
        entered.set()
        with lock:
            return x

    async def alocked(x: int) -> int:
        return locked(x)

    before = set(threading.enumerate())
    fn = alocked if runtime == "async" else locked
    pipeline = cv.Pipeline(range(100)).map(fn, runtime=runtime, name="locked")  # type: ignore[call-overload]

    def press() -> None:
        entered.wait(30)
        pressed.append(time.monotonic())
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    pressed: list[float] = []
    presser = threading.Thread(target=press)
    presser.start()
    with pytest.raises(KeyboardInterrupt) as info:
        pipeline.run()
    took = time.monotonic() - pressed[0]
    presser.join()
    assert took < BOUND, f"Ctrl-C took {took:.2f} s to return"
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "stage 'locked' (map) is stuck in user code: left behind: conveyor-locked-0" in notes
    # Each leftover is said for what it is: an async worker is a task, whose loop's
    # thread it blocks.
    what = {
        "thread": "conveyor-locked-0 (a daemon thread, which does not keep the interpreter",
        "async": "conveyor-locked-0 (an asyncio task, which runs on in the event loop's daemon "
        "thread); conveyor-async-loop (a daemon thread,",
    }[runtime]
    assert what in notes, notes
    left = set(threading.enumerate()) - before
    assert left and all(t.daemon for t in left), left
    lock.release()
    for thread in left:
        thread.join(30)
    assert not [t for t in left if t.is_alive()]


SCRIPT = """
    import sys, threading
    import conveyor as cv

    def stuck(x):
        if x == 3:
            print("stuck", flush=True)
            threading.Event().wait()  # forever: only the interpreter's exit ends it
        return x

    if __name__ == "__main__":
        cv.Pipeline(range(100)).map(stuck, runtime=sys.argv[1], workers=2).run()
"""


@pytest.mark.parametrize(
    "runtime",
    [
        "thread",
        "process",
        pytest.param(
            "interpreter",
            marks=pytest.mark.skipif(
                sys.version_info < (3, 14), reason="runtime='interpreter' needs Python 3.14+"
            ),
        ),
    ],
)
def test_the_interpreter_exits_promptly_after_ctrl_c_with_a_stage_stuck(
    tmp_path: Path, runtime: str
) -> None:
    script = tmp_path / "stuck.py"
    script.write_text(textwrap.dedent(SCRIPT))
    proc = subprocess.Popen(
        [sys.executable, str(script), runtime],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "stuck\n"
        pressed = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - pressed
    finally:
        proc.kill()
        proc.wait()
    # An uncaught KeyboardInterrupt ends Python with SIGINT, as a shell expects.
    assert proc.returncode == -signal.SIGINT, err
    assert "KeyboardInterrupt" in err
    if runtime != "process":  # a worker process is killed; a thread or an interpreter cannot be
        assert "stage 'stuck' (map) is stuck in user code: left behind" in err, err
    assert took < 2 * BOUND, f"the interpreter took {took:.2f} s to exit after Ctrl-C"
