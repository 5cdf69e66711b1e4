"""Shared fixtures for conveyor's tests.

Real Redis servers
------------------
Tests of the Redis Streams backend talk to a real ``redis-server`` (Debian's
package; ``scripts/test.sh`` installs it when missing), never to a mock:

- ``redis_server``: one server for the whole session, on a free port of
  127.0.0.1, with no persistence. It has ``.host``, ``.port`` and ``.url``
  (``redis://127.0.0.1:PORT/0``), and ``.stop()`` / ``.start()`` to restart it
  on the same port. A test that stops it must start it again (in a
  ``finally:``), since later tests share it; its data does not survive a stop.
- ``redis_server_factory``: starts extra servers with extra command-line
  arguments (``--requirepass``, TLS options, ...) for one test, and stops them
  after it.

Without ``redis-server`` on PATH these fixtures skip the test, saying how to
install it, except when the environment variable ``CI`` is set: then they fail.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Protocol

import pytest

# --- Redis ------------------------------------------------------------------------

REDIS_HOST = "127.0.0.1"
REDIS_START_TIMEOUT = 15.0  # seconds for a server to answer PING after its start
REDIS_STOP_TIMEOUT = 10.0  # seconds for a server to exit after SIGTERM
REDIS_INSTALL_HINT = (
    "redis-server is not on PATH. Install it with `apt-get install redis-server` "
    "(Debian/Ubuntu), or run scripts/test.sh, which installs it."
)


class RedisServerError(RuntimeError):
    """A test Redis server could not be started."""


def free_port(host: str = REDIS_HOST) -> int:
    """A TCP port of `host` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _resp_command(*args: str) -> bytes:
    """One Redis command in RESP form."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _read_line(sock: socket.socket) -> bytes:
    """Read one CRLF-terminated reply line (simple strings and errors only)."""
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1024)
        if not chunk:
            raise ConnectionError(f"connection closed after {data!r}")
        data += chunk
    return data


class RedisServer:
    """A ``redis-server`` child process on ``host:port``, for tests.

    ``start()`` launches it and waits until it answers PING; ``stop()`` ends it.
    The port is chosen on the first start and kept by later ones.
    """

    def __init__(
        self,
        binary: str,
        workdir: Path,
        *,
        extra_args: Sequence[str] = (),
        password: str | None = None,
        tls: bool = False,
        host: str = REDIS_HOST,
    ) -> None:
        self.binary = binary
        self.workdir = workdir
        self.extra_args = tuple(extra_args)
        self.password = password
        self.tls = tls
        self.host = host
        self.port = 0  # chosen by the first start()
        self.log_path = workdir / "redis-server.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisServer {self.url} {state}>"

    @property
    def url(self) -> str:
        """``redis://[:password@]host:port/0`` (``rediss://`` with TLS)."""
        scheme = "rediss" if self.tls else "redis"
        auth = f":{self.password}@" if self.password else ""
        return f"{scheme}://{auth}{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def command(self, *args: str, timeout: float = 5.0) -> bytes:
        """Send one command on a fresh plain-TCP connection; return the reply line.

        Authenticates first when the server has a password. Meant for simple
        replies (PING, FLUSHALL, CONFIG SET ...); use a real client for data.
        """
        with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
            if self.password is not None:
                sock.sendall(_resp_command("AUTH", self.password))
                reply = _read_line(sock)
                if not reply.startswith(b"+OK"):
                    raise RedisServerError(f"AUTH failed: {reply!r}")
            sock.sendall(_resp_command(*args))
            return _read_line(sock)

    def flushall(self) -> None:
        """Delete every key of every database."""
        reply = self.command("FLUSHALL")
        if not reply.startswith(b"+OK"):
            raise RedisServerError(f"FLUSHALL failed: {reply!r}")

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _argv(self) -> list[str]:
        if self.tls:
            ports = ["--port", "0", "--tls-port", str(self.port)]
        else:
            ports = ["--port", str(self.port)]
        argv = [
            self.binary,
            *ports,
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(self.workdir),
        ]
        if self.password is not None:
            argv += ["--requirepass", self.password]
        return argv + list(self.extra_args)  # later arguments win

    def _answers(self) -> bool:
        """Whether the server accepts connections and serves commands."""
        if self.tls:
            # A TLS handshake needs the test's certificates; redis-server only
            # listens once it is ready to serve, so an accepted connection is enough.
            with socket.create_connection((self.host, self.port), timeout=1.0):
                return True
        reply = self.command("PING", timeout=1.0)
        # NOAUTH: a password given in extra_args; the server is up all the same.
        return reply.startswith((b"+PONG", b"-NOAUTH"))

    def start(self, timeout: float = REDIS_START_TIMEOUT) -> None:
        """Start the server (no-op when running) and wait until it answers PING."""
        if self.running:
            return
        # A free port can be taken between free_port() and the server's bind:
        # on the first start, try again on another port.
        attempts = 3 if self.port == 0 else 1
        for attempt in range(attempts):
            if self.port == 0 or (attempts > 1 and attempt > 0):
                self.port = free_port(self.host)
            try:
                self._launch(timeout)
            except RedisServerError:
                if attempt == attempts - 1:
                    raise
            else:
                return

    def _launch(self, timeout: float) -> None:
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            self._argv(),
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the terminal reaches pytest only
        )
        deadline = time.monotonic() + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                self._reap()
                raise RedisServerError(
                    f"redis-server on port {self.port} exited with code {code}:\n" + self.log_tail()
                )
            try:
                if self._answers():
                    return
            except (OSError, RedisServerError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RedisServerError(
                    f"redis-server on port {self.port} did not answer within "
                    f"{timeout:.0f} s:\n" + self.log_tail()
                )
            time.sleep(0.02)

    def stop(self, timeout: float = REDIS_STOP_TIMEOUT) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait for it to exit."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._reap()

    def _reap(self) -> None:
        if self._proc is not None:
            self._proc.wait()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


class RedisServerFactory(Protocol):
    """The type of the ``redis_server_factory`` fixture."""

    def __call__(
        self, *extra_args: str, password: str | None = None, tls: bool = False
    ) -> RedisServer: ...


def _redis_binary() -> str:
    """redis-server's path; skips the test without it (fails it on CI)."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(f"CI is set but {REDIS_INSTALL_HINT}", pytrace=False)
        pytest.skip(REDIS_INSTALL_HINT)
    return binary


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real Redis server shared by the session (see the module docstring)."""
    server = RedisServer(_redis_binary(), tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RedisServerFactory]:
    """Start extra Redis servers for one test: ``factory(*extra_args, password=, tls=)``.

    ``password`` adds ``--requirepass`` and goes into ``.url``. ``tls=True`` serves
    TLS only, on ``.port`` (``rediss://`` URL); the test passes the certificate
    options itself (``--tls-cert-file``, ``--tls-key-file``, ``--tls-ca-cert-file``,
    ...).
    """
    binary = _redis_binary()
    servers: list[RedisServer] = []

    def start(*extra_args: str, password: str | None = None, tls: bool = False) -> RedisServer:
        server = RedisServer(
            binary,
            tmp_path_factory.mktemp("redis-extra"),
            extra_args=extra_args,
            password=password,
            tls=tls,
        )
        servers.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in reversed(servers):
            server.stop()


# --- Commands run in-process --------------------------------------------------------


@pytest.fixture
def conveyor_logger_kept() -> Iterator[None]:
    """Undo what a command does to the ``conveyor`` logger: ``conveyor worker``
    adds a handler on the stderr of its CliRunner, which later commands would use."""
    logger = logging.getLogger("conveyor")
    handlers, level = logger.handlers[:], logger.level
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)


if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    # Started in the background by a shell without job control (`.ci/run &`): SIGINT
    # is ignored, so Python installed no KeyboardInterrupt handler, and the Ctrl-C
    # tests (and the programs they start, which inherit an ignored signal) would wait
    # for ever. Restore what an interactive start gives.
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _sigint_left_unblocked() -> Iterator[None]:
    """Fail the test that leaves SIGINT blocked in the main thread, or its handler
    changed: every later Ctrl-C test of the session would hang, far from the cause."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is not handler:
        left = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, handler)
        pytest.fail(f"the test left SIGINT's handler changed: {left!r}")
    if not hasattr(signal, "pthread_sigmask"):
        return
    if signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, ()):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        pytest.fail("the test left SIGINT blocked in the main thread")
