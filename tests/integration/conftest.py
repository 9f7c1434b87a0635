"""One real tritonserver for the whole session, started with ``hetserve serve``.

The fixture stops it by PID (SIGTERM to the launcher, which stops the server's
process group) and checks that no /dev/shm file of this server is left; it
removes any leftovers either way, so a failing run does not leak.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from engine_runner import EngineProcess
from hetserve import shm
from hetserve_client import scrape_metrics, wait_ready

STARTUP_TIMEOUT_S = 600
# llm writes its metrics on a thread of its own (triton/metrics.py): a scrape
# just after a request's last response may miss that request's updates.
SETTLE_S = 0.2
SETTLE_TIMEOUT_S = 5


def _written(samples: dict[str, float]) -> dict[str, float]:
    """hetserve's counters and histograms: what a finished request moves (not gauges, not Triton's own)."""
    gauges = ("hetserve_requests_running", "hetserve_requests_waiting")
    return {k: v for k, v in samples.items() if k.startswith(("vllm:", "hetserve_")) and not k.startswith(gauges)}


@dataclass(frozen=True)
class Server:
    pid: int
    http_url: str
    grpc_url: str
    metrics_url: str
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """Every sample on the metrics port, keyed by name and labels as printed.

        Scraped until hetserve's counters hold still for SETTLE_S (at most
        SETTLE_TIMEOUT_S), so that the requests that ended are counted.
        """
        found = scrape_metrics(self.metrics_url)
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while time.monotonic() < deadline:
            time.sleep(SETTLE_S)
            last, found = found, scrape_metrics(self.metrics_url)
            if _written(found) == _written(last):
                break
        return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shm_files(launcher_pid: int) -> list[str]:
    prefixes = [shm.server_prefix(str(launcher_pid)), shm.triton_region_prefix(str(launcher_pid))]
    return [path for prefix in prefixes for path in glob.glob(f"/dev/shm/{glob.escape(prefix)}*")]


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    yield from run_server(tmp_path_factory)


class PortTaken(Exception):
    """A port picked as free was taken before the server bound it (another process's ephemeral port)."""


def _launch(tmp_path_factory, args) -> tuple[subprocess.Popen, Server]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    http, grpc, metrics = free_port(), free_port(), free_port()
    command = [
        sys.executable, "-m", "hetserve.cli", "serve",
        "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), *args,
    ]
    with open(log, "wb") as out:
        launcher = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    return launcher, Server(launcher.pid, f"127.0.0.1:{http}", f"127.0.0.1:{grpc}", f"127.0.0.1:{metrics}", log)


def _wait_started(launcher: subprocess.Popen, server: Server) -> None:
    started = time.monotonic()
    deadline = started + STARTUP_TIMEOUT_S
    while True:
        if launcher.poll() is not None:
            if "already in use" in server.log_text():
                raise PortTaken(server.log_text()[-2000:])
            pytest.fail(f"hetserve serve exited with {launcher.returncode}:\n{server.log_text()[-6000:]}")
        try:
            wait_ready(server.http_url, timeout=5)
            # HTTP says ready before the metrics service binds its port (last);
            # if that port was taken, the server exits just after.
            with urllib.request.urlopen(f"http://{server.metrics_url}/metrics", timeout=2):
                pass
            if launcher.poll() is None:
                break
        except (TimeoutError, OSError):
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{server.log_text()[-6000:]}")
    print(f"\nserver ready in {time.monotonic() - started:.1f} s", file=sys.stderr)


def run_server(tmp_path_factory, *args: str):
    """Start ``hetserve serve ARGS``, yield it once ready, stop it and check /dev/shm.

    Ports are picked free and then bound by the server; if another process
    took one in between, the server is started again on others.
    """
    for attempt in range(3):
        launcher, server = _launch(tmp_path_factory, args)
        try:
            _wait_started(launcher, server)
            break
        except PortTaken as exc:
            stop(launcher)
            if attempt == 2:
                pytest.fail(f"ports taken three times over:\n{exc}")
        except BaseException:
            stop(launcher)
            raise
    try:
        yield server
    finally:
        leftovers = stop(launcher)
        if leftovers:
            pytest.fail(f"the server left /dev/shm files behind: {leftovers}")
        if TEARDOWN_TRACEBACK in server.log_text():
            pytest.fail(f"a stub printed a traceback at exit ({TEARDOWN_TRACEBACK}...)")


# vLLM's AsyncLLM shutting down a second time at interpreter teardown (engine.py).
TEARDOWN_TRACEBACK = "Exception ignored in: <function AsyncLLM.__del__"


def stop(launcher: subprocess.Popen) -> list[str]:
    """Stop the launcher (and so the server); return what it left in /dev/shm."""
    family = []
    try:
        family = psutil.Process(launcher.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    if launcher.poll() is None:
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.wait(150)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait()
    for process in family:  # only if the launcher failed to stop them
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    leftovers = shm_files(launcher.pid)
    for path in leftovers:
        os.unlink(path)
    return leftovers


REFERENCE_ENGINES = 2  # kept running at once (the least recently used one stops)


@pytest.fixture(scope="session")
def reference(engine_args, tmp_path_factory):
    """Outputs of one offline vLLM engine (no split) for given prompts and sampling.

    The engine arguments default to the session server's; pass others for a
    server on another checkpoint, and ``env`` to run the engine with other
    environment variables (the OpenMP team's size). Engines stay up between
    calls (engine_runner.py).
    """
    cache: dict[tuple, list[dict]] = {}
    engines: dict[str, EngineProcess] = {}  # by engine arguments, least recently used first

    def outputs(prompts: list[str], sampling: dict, args: dict | None = None, env: dict | None = None) -> list[dict]:
        args = args or engine_args
        engine_key = json.dumps([args, env], sort_keys=True, default=str)
        key = (tuple(prompts), json.dumps(sampling, sort_keys=True), engine_key)
        if key not in cache:
            engine = engines.pop(engine_key, None)
            if engine is None:
                while len(engines) >= REFERENCE_ENGINES:
                    engines.pop(next(iter(engines))).close()
                engine = EngineProcess({"engine_args": args}, tmp_path_factory.mktemp("reference"), env=env)
            engines[engine_key] = engine
            cache[key] = engine.generate([{"prompt": p, "sampling": sampling} for p in prompts])
        return cache[key]

    yield outputs
    for engine in engines.values():
        engine.close()
