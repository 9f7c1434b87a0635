"""A server for a benchmark run: started on free loopback ports, stopped after."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def started(model: str | None, engine_args: dict, **options) -> Iterator[tuple[str, str, str, int]]:
    """Yield the (HTTP, gRPC, metrics) addresses of a ready server, and its pid."""
    from hetserve.launcher import Server, ServeOptions

    ports = free_port(), free_port(), free_port()
    server = Server(ServeOptions(
        model=model, http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2], engine_args=engine_args, **options
    ))
    try:
        server.start()
        server.wait_ready()
        yield (*(f"127.0.0.1:{port}" for port in ports), server.process.pid)
    finally:
        server.stop()
