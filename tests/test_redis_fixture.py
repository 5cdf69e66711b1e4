"""The Redis fixtures of conftest.py start real servers that answer on raw sockets."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import RedisServer, RedisServerFactory

pytestmark = [pytest.mark.redis, pytest.mark.quick]


def raw_ping(host: str, port: int) -> bytes:
    """PING over a plain socket, without any Redis client library."""
    with socket.create_connection((host, port), timeout=5.0) as sock:
        sock.sendall(b"*1\r\n$4\r\nPING\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(64)
            if not chunk:
                break
            reply += chunk
        return reply


def test_server_answers_ping(redis_server: RedisServer) -> None:
    assert redis_server.host == "127.0.0.1"
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert raw_ping(redis_server.host, redis_server.port) == b"+PONG\r\n"


def test_stop_then_start_on_the_same_port(redis_server: RedisServer) -> None:
    port = redis_server.port
    redis_server.stop()
    try:
        assert redis_server.pid is None
        with pytest.raises(OSError):
            raw_ping(redis_server.host, port)
    finally:
        redis_server.start()
    assert redis_server.running
    assert redis_server.port == port
    assert raw_ping(redis_server.host, port) == b"+PONG\r\n"


def test_factory_passes_extra_arguments(
    redis_server_factory: RedisServerFactory, redis_server: RedisServer
) -> None:
    server = redis_server_factory("--requirepass", "secret")
    assert server.port != redis_server.port
    assert raw_ping(server.host, server.port).startswith(b"-NOAUTH")

    with_password = redis_server_factory(password="s3cret")
    assert with_password.url == f"redis://:s3cret@127.0.0.1:{with_password.port}/0"
    assert with_password.command("PING") == b"+PONG\r\n"
