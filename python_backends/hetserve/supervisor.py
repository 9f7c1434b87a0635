"""Bring back a model whose stub or vLLM engine died, and clear up after it.

Triton 2.51 does not restart the stub of a decoupled Python model: after a
stub dies, every request to that model fails ("Stub process ... is not
healthy") while ``/v2/health/ready`` still says ready, and the dead stub's
vLLM processes live on as orphans. A vLLM engine core that dies leaves its
model's stub up but unable to serve. The launcher runs Triton with explicit
model control and calls ``Supervisor.poll`` about twice a second; for each
model it knows the stub and engine core processes, and when one of them is
gone it

1. unloads the model through Triton's repository API, so the model (and, with
   strict readiness, the server) reads not-ready;
2. kills what is left of the old instance: processes of the server's process
   group that no longer descend from tritonserver (orphaned engine cores and
   their workers);
3. removes the /dev/shm files that the old instance's processes had mapped
   and no live process maps any more (vLLM's ``psm_*`` queues and
   ``sem.mp-*`` semaphores: random names, so noted while they are mapped);
4. loads the model again and waits until it is ready (retrying with a back-off
   if that fails).

A stub that misses one of Triton's 1-s health checks while it initialises
(starved of CPU for a second on a busy host; hetserve's initialise takes a
minute on two cores) makes Triton 2.51 give up on it and then wait for it to
exit (python_backend r24.10, ``StubLauncher::Launch`` → ``WaitForStubProcess``:
``waitpid``, no kill), which it never does: the load hangs for ever, with
nothing logged. ``LaunchWatch`` sees tritonserver blocked in ``waitpid`` on
a live stub for HUNG_LAUNCH_S; that stub is then killed, so that the load
fails and can be tried again.

Requests that a dead ``prefill`` held are the ``llm`` model's to end (it gives
up on them and prefills locally). Requests that a dead ``llm`` stub held cannot
be ended by anyone: Triton keeps their response factories only in messages to
that stub (python_backend r24.10, ``python_be.cc``), so their clients wait for
their own deadline. Killing ``llm``'s engine core instead ends them with an
error at once.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from hetserve.shm import SHM_DIR

logger = logging.getLogger(__name__)

ENGINE_CORE_TITLE = "VLLM::EngineCore"
ADMIN_HEADER = "hetserve-admin-key"
RESTART_BACKOFF_S = (1.0, 5.0, 15.0, 30.0)
RETIRED_GRACE_S = 60.0  # for an unloaded instance's stub to finish (vLLM's own shutdown takes up to 30 s)
HUNG_LAUNCH_S = 20.0  # tritonserver blocked in waitpid on a live stub this long: the launch hung


class TritonAdmin:
    """The parts of Triton's HTTP API the launcher uses, with the admin key."""

    def __init__(self, host: str, http_port: int, key: str | None):
        self.base = f"http://{host}:{http_port}"
        self.key = key

    def _call(self, path: str, body: bytes | None = None, timeout: float = 5.0) -> int:
        request = urllib.request.Request(self.base + path, data=body, method="POST" if body is not None else "GET")
        if self.key:
            request.add_header(ADMIN_HEADER, self.key)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def ready(self, model: str | None = None) -> bool:
        path = f"/v2/models/{model}/ready" if model else "/v2/health/ready"
        return self._call(path) == 200

    def unload(self, model: str) -> bool:
        return self._call(f"/v2/repository/models/{model}/unload", b"{}", timeout=120) == 200

    def load(self, model: str, timeout: float) -> bool:
        return self._call(f"/v2/repository/models/{model}/load", b"{}", timeout=timeout) == 200


def shm_mapped(processes) -> set[str]:
    """/dev/shm files mapped by any of ``processes``."""
    found = set()
    for process in processes:
        try:
            with open(f"/proc/{process.pid}/maps") as maps:
                for line in maps:
                    path = line.rstrip("\n").split(maxsplit=5)[-1]
                    if path.startswith(SHM_DIR + "/"):
                        found.add(path.removesuffix(" (deleted)"))
        except OSError:
            continue
    return found


def alive(process: psutil.Process | None) -> bool:
    try:
        return process is not None and process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def is_resource_tracker(process: psutil.Process) -> bool:
    try:
        return "multiprocessing.resource_tracker" in " ".join(process.cmdline())
    except psutil.Error:
        return False


def group_members(pgid: int) -> list[psutil.Process]:
    """The processes of process group ``pgid`` (this one excepted)."""
    found = []
    for process in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(process.pid) == pgid and process.pid != os.getpid():
                found.append(process)
        except (psutil.Error, OSError):
            continue
    return found


def _wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until none of ``processes`` is alive (zombies count as gone); return those left."""
    deadline = time.monotonic() + timeout
    left = [p for p in processes if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if alive(p)]
    return left


def kill_letting_trackers_clean(processes: list[psutil.Process], grace_s: float = 5.0) -> list[int]:
    """SIGKILL ``processes``, but give Python's resource trackers among them time to clean up.

    A tracker unlinks the semaphores (``sem.mp-*``) and shared memory
    (``psm_*``) its processes registered once all of them are gone; killed
    first, it would leave those files behind.
    """
    processes = [p for p in processes if alive(p)]  # a zombie only waits for its parent
    trackers = [p for p in processes if is_resource_tracker(p)]
    others = [p for p in processes if p not in trackers]
    for process in others:
        try:
            process.kill()
        except psutil.Error:
            pass
    _wait_gone(others, 10.0)
    for process in _wait_gone(trackers, grace_s):
        try:
            process.kill()
        except psutil.Error:
            pass
    killed = [p.pid for p in processes]
    if killed:
        logger.info("stopped %d orphaned process(es) of the server: %s", len(killed), killed)
    return killed


# wait4's syscall number, as /proc/<pid>/task/<tid>/syscall shows it
_WAIT4 = {"x86_64": "61", "aarch64": "260"}.get(platform.machine())


def waited_on(pid: int) -> set[int] | None:
    """The pids that threads of process ``pid`` are blocked in waitpid on.

    From each thread's ``/proc/.../syscall`` (readable by the parent, and by
    the same user where ptrace is not restricted); None when a thread waits
    (its wchan is ``do_wait``) and that file cannot be read, or wait4's
    number on this architecture is not known.
    """
    found: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                if f.read().strip() != "do_wait":
                    continue
        except OSError:
            continue
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                fields = f.read().split()
        except OSError:
            return None
        if _WAIT4 is None:
            return None
        if len(fields) >= 2 and fields[0] == _WAIT4:  # not "running" (it just woke) nor another call
            found.add(int(fields[1], 16))
    return found


class LaunchWatch:
    """Tell a hung stub launch (see the module's docstring) from a slow one."""

    def __init__(self, server_pid: int, hung_after_s: float = HUNG_LAUNCH_S):
        self.server_pid = server_pid
        self.hung_after_s = hung_after_s
        self._since: dict[int, float] = {}  # stub pid -> since when tritonserver waits on it
        self._unreadable = False

    def hung(self, stubs: list[psutil.Process]) -> list[psutil.Process]:
        """Those of ``stubs`` (live ones a load may wait on) that tritonserver has waited on for hung_after_s.

        Call it about twice a second while a load runs.
        """
        waited = waited_on(self.server_pid)
        if waited is None:  # cannot tell which child: never kill on a guess
            if not self._unreadable:
                logger.warning(
                    "cannot read whom tritonserver (pid %d) waits for (/proc/.../syscall); a hung stub launch will not "
                    "be detected", self.server_pid,
                )
                self._unreadable = True
            return []
        now = time.monotonic()
        hung = []
        for stub in stubs:
            if alive(stub) and stub.pid in waited:
                since = self._since.setdefault(stub.pid, now)
                if now - since >= self.hung_after_s:
                    hung.append(stub)
            else:
                self._since.pop(stub.pid, None)
        return hung

    @staticmethod
    def kill(stubs: list[psutil.Process], what: str) -> None:
        logger.error(
            "%s: Triton gave up on its stub (a missed 1-s health check while it initialised: starved of CPU? or a "
            "failed initialise) and has waited %.0f s for it to exit, which a starved stub never does (Triton 2.51); "
            "killing the stub (pid %s) so that the load fails and can be tried again",
            what, HUNG_LAUNCH_S, ", ".join(str(s.pid) for s in stubs),
        )
        family = []
        for stub in stubs:
            try:
                family += [stub, *stub.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        kill_letting_trackers_clean(family)


def live_stubs(server: psutil.Process, model: str | None = None, skip: set[int] = frozenset()) -> list[psutil.Process]:
    """tritonserver's live stub processes (of ``model``, or all), but those in ``skip``."""
    try:
        children = server.children()
    except psutil.Error:
        return []
    return [
        c for c in children
        if c.pid not in skip and (name := stub_model(c)) is not None and (model is None or name == model) and alive(c)
    ]


def stub_model(process: psutil.Process) -> str | None:
    """The model a Python backend stub serves: its first argument is ``<repo>/<model>/<version>/model.py``."""
    try:
        argv = process.cmdline()
    except psutil.Error:
        return None
    if len(argv) < 2 or not argv[0].endswith("triton_python_backend_stub"):
        return None
    return Path(argv[1]).parents[1].name


def engine_core(stub: psutil.Process) -> psutil.Process | None:
    try:
        for child in stub.children():
            if child.cmdline()[:1] and child.cmdline()[0].startswith(ENGINE_CORE_TITLE):
                return child
    except psutil.Error:
        pass
    return None


@dataclass(slots=True)
class Watched:
    """One model instance as last seen: its stub, its engine core, what its processes mapped."""

    stub: psutil.Process
    engine: psutil.Process | None = None
    files: set[str] = field(default_factory=set)


class Supervisor:
    def __init__(
        self, server_pid: int, admin: TritonAdmin, models: list[str], load_timeout: float = 900.0,
        stop: threading.Event | None = None,
    ):
        self.server = psutil.Process(server_pid)
        self.stop = stop or threading.Event()  # set: give up waiting (the launcher is stopping)
        self.admin = admin
        self.models = models
        self.load_timeout = load_timeout
        self.watched: dict[str, Watched] = {}
        self.restarts: dict[str, int] = {m: 0 for m in models}
        self.lost_files: set[str] = set()  # noted by instances that died
        # Stubs of unloaded instances, and when to kill them if Triton has not
        # finished them by then (one that holds calls to a dead prefill never is).
        self.retired: dict[int, tuple[psutil.Process, float]] = {}
        self._last_files = 0.0

    def family(self) -> list[psutil.Process]:
        try:
            return [self.server, *self.server.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def note(self) -> None:
        """Learn each model's stub and engine core, and the files they map."""
        now = time.monotonic()
        refresh_files = now - self._last_files > 5.0
        for stub in self.server.children():
            model = stub_model(stub)
            if model not in self.models or not alive(stub) or stub.pid in self.retired:
                continue
            seen = self.watched.get(model)
            if seen is None or seen.stub.pid != stub.pid:
                seen = self.watched[model] = Watched(stub)
                refresh_files = True
            if seen.engine is None:
                seen.engine = engine_core(stub)
            if refresh_files:
                try:
                    seen.files |= shm_mapped([stub, *stub.children(recursive=True)])
                except psutil.NoSuchProcess:
                    pass
        if refresh_files:
            self._last_files = now

    def dead(self) -> list[tuple[str, str]]:
        """(model, what died) for each watched model that lost its stub or engine core."""
        found = []
        for model, seen in self.watched.items():
            if not alive(seen.stub):
                found.append((model, f"its stub (pid {seen.stub.pid})"))
            elif seen.engine is not None and not alive(seen.engine):
                found.append((model, f"its vLLM engine core (pid {seen.engine.pid})"))
        return found

    def poll(self) -> None:
        self.note()
        for model, what in self.dead():
            self.restart(model, what)
        self.reap_retired()

    def reap_retired(self) -> None:
        """Kill the stubs of unloaded instances that outlive their grace."""
        now = time.monotonic()
        for pid, (stub, deadline) in list(self.retired.items()):
            if not alive(stub):
                del self.retired[pid]
            elif now > deadline:
                logger.warning("stub pid %d of an unloaded instance is still there; killing it", pid)
                try:
                    family = [stub, *stub.children(recursive=True)]
                except psutil.NoSuchProcess:
                    family = []
                kill_letting_trackers_clean(family)
                del self.retired[pid]

    def restart(self, model: str, what: str) -> None:
        old = self.watched.pop(model)
        self.lost_files |= old.files
        self.retired[old.stub.pid] = (old.stub, time.monotonic() + RETIRED_GRACE_S)
        self.restarts[model] += 1
        logger.error("%s: %s died; unloading it (not ready) and loading it again", model, what)
        self.admin.unload(model)
        self.kill_orphans()
        self.remove_unmapped(old.files)
        for attempt, backoff in enumerate((0.0, *RESTART_BACKOFF_S)):
            if self.stop.wait(backoff):
                return
            started = time.monotonic()
            if self._load(model):
                logger.info("%s: loaded again in %.1f s (restart %d)", model, time.monotonic() - started, self.restarts[model])
                self.note()
                return
            if self.stop.is_set():
                return
            logger.error("%s: loading failed (attempt %d)", model, attempt + 1)
            self.kill_orphans()
        logger.error("%s: could not be loaded again; it stays unavailable", model)

    def _load(self, model: str) -> bool:
        """Load ``model`` and say whether it is ready; a hung stub launch is killed (the load fails).

        The load waits in a thread: this one watches the launch, and stops
        waiting when the launcher stops (SIGTERM, SIGINT).
        """
        done, result = threading.Event(), []

        def load() -> None:
            try:
                result.append(self.admin.load(model, self.load_timeout))
            finally:
                done.set()

        threading.Thread(target=load, name=f"load-{model}", daemon=True).start()
        watch = LaunchWatch(self.server.pid)
        while not done.wait(0.5):
            if self.stop.is_set():
                return False
            hung = watch.hung(live_stubs(self.server, model, skip=set(self.retired)))
            if hung:
                watch.kill(hung, model)
        return bool(result and result[0]) and self.admin.ready(model)

    def kill_orphans(self) -> list[int]:
        """SIGKILL processes of the server's group that left tritonserver's tree."""
        family = {p.pid for p in self.family()}
        return kill_letting_trackers_clean([p for p in group_members(self.server.pid) if p.pid not in family])

    def remove_unmapped(self, files: set[str]) -> list[str]:
        """Remove those of ``files`` that no process of the server maps any more."""
        still = shm_mapped(self.family())
        removed = []
        for path in sorted(files - still):
            try:
                os.unlink(path)
                removed.append(path)
            except FileNotFoundError:
                pass
        if removed:
            logger.info("removed %d /dev/shm file(s) of the dead instance", len(removed))
        return removed

    def summary(self) -> str:
        return json.dumps(self.restarts)
