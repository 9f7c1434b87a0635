"""The launcher's fault handling without a server: the Supervisor's decisions,
clean-up after dead servers, the /dev/shm check, restricted APIs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import psutil
import pytest

from hetserve import shm, supervisor
from hetserve.launcher import (
    ConfigError, ServeOptions, TritonInstall, check_shm_capacity, clean_dead_servers, prepare_repository,
    server_command,
)
from hetserve.supervisor import Supervisor


class FakeProcess:
    def __init__(self, pid, argv, children=()):
        self.pid, self.argv, self._children, self.dead = pid, argv, list(children), False

    def cmdline(self):
        return self.argv

    def children(self, recursive=False):
        out = list(self._children)
        if recursive:
            for child in self._children:
                out += child.children(recursive=True)
        return [c for c in out if not c.dead]

    def is_running(self):
        return not self.dead

    def status(self):
        return psutil.STATUS_ZOMBIE if self.dead else psutil.STATUS_SLEEPING


class FakeAdmin:
    def __init__(self):
        self.calls = []

    def unload(self, model):
        self.calls.append(("unload", model))
        return True

    def load(self, model, timeout):
        self.calls.append(("load", model))
        return True

    def ready(self, model=None):
        return True


def tree(prefill_engine_dead=False):
    def model(name, pid):
        engine = FakeProcess(pid + 1, ["VLLM::EngineCore"], [FakeProcess(pid + 2, ["VLLM::Worker"])])
        return FakeProcess(pid, ["/b/python/triton_python_backend_stub", f"/r/{name}/1/model.py", "region"], [engine])

    return FakeProcess(10, ["tritonserver"], [model("prefill", 100), model("llm", 200)])


@pytest.fixture
def watched(monkeypatch):
    server = tree()
    monkeypatch.setattr(supervisor.psutil, "Process", lambda pid: server)
    monkeypatch.setattr(supervisor, "shm_mapped", lambda procs: {f"/dev/shm/psm_{p.pid}" for p in procs})
    monkeypatch.setattr(Supervisor, "kill_orphans", lambda self: [])
    removed = []
    monkeypatch.setattr(Supervisor, "remove_unmapped", lambda self, files: removed.append(set(files)))
    monkeypatch.setattr(supervisor.time, "sleep", lambda s: None)
    monkeypatch.setattr(supervisor, "RESTART_BACKOFF_S", (0.0,) * len(supervisor.RESTART_BACKOFF_S))
    sup = Supervisor(10, FakeAdmin(), ["prefill", "llm"])
    return SimpleNamespace(server=server, sup=sup, removed=removed)


def test_a_dead_stub_is_unloaded_cleaned_up_and_loaded_again(watched):
    sup, server = watched.sup, watched.server
    sup.poll()
    assert set(sup.watched) == {"prefill", "llm"} and sup.watched["prefill"].engine.pid == 101
    assert sup.admin.calls == []  # all alive: nothing to do
    prefill_stub = server._children[0]
    prefill_stub.dead = True
    sup.poll()
    assert sup.admin.calls == [("unload", "prefill"), ("load", "prefill")]
    assert sup.restarts == {"prefill": 1, "llm": 0}
    assert watched.removed == [{"/dev/shm/psm_100", "/dev/shm/psm_101", "/dev/shm/psm_102"}]
    assert "/dev/shm/psm_101" in sup.lost_files  # still removed at stop if anything maps it now


def test_a_dead_engine_core_under_a_live_stub_reloads_its_model(watched):
    sup, server = watched.sup, watched.server
    sup.poll()
    llm_engine = server._children[1]._children[0]
    llm_engine.dead = True
    sup.poll()
    assert sup.admin.calls == [("unload", "llm"), ("load", "llm")]
    assert sup.restarts["llm"] == 1


def test_an_unloaded_instances_lingering_stub_is_not_watched_and_is_killed_after_its_grace(watched, monkeypatch):
    sup, server = watched.sup, watched.server
    sup.poll()
    old_stub = server._children[1]
    old_stub._children[0].dead = True  # llm's engine core dies; its stub lingers
    new_stub = FakeProcess(300, ["/b/python/triton_python_backend_stub", "/r/llm/1/model.py", "region"],
                           [FakeProcess(301, ["VLLM::EngineCore"])])
    sup.admin.load = lambda model, timeout: server._children.append(new_stub) or True
    sup.poll()
    assert sup.watched["llm"].stub is new_stub and 200 in sup.retired
    for _ in range(3):  # no flapping between the two stubs, no second restart
        sup.poll()
        assert sup.watched["llm"].stub is new_stub and sup.restarts["llm"] == 1
    killed = []
    monkeypatch.setattr(supervisor, "kill_letting_trackers_clean", lambda procs: killed.extend(p.pid for p in procs))
    monkeypatch.setattr(supervisor, "RETIRED_GRACE_S", 0)
    sup.retired[200] = (old_stub, 0.0)  # its grace is over
    sup.poll()
    assert 200 in killed and 200 not in sup.retired


def test_a_model_that_cannot_be_loaded_again_is_retried_then_left_unavailable(watched, caplog):
    sup, server = watched.sup, watched.server
    sup.poll()
    sup.admin.load = lambda model, timeout: False
    server._children[0].dead = True
    sup.poll()
    assert "could not be loaded again; it stays unavailable" in caplog.text
    assert "prefill" not in sup.watched


def test_a_hung_stub_launch_is_killed_and_the_load_tried_again(watched, monkeypatch):
    """Triton waits for ever on a stub it gave up on (supervisor's docstring): kill it, the load fails, load again."""
    sup, server = watched.sup, watched.server
    sup.poll()
    released = threading.Event()
    loads = []

    new_stub = FakeProcess(400, ["/b/python/triton_python_backend_stub", "/r/prefill/1/model.py", "region"])

    def load(model, timeout):
        loads.append(model)
        if len(loads) == 1:  # the first load's stub launch hangs until that stub is killed
            server._children.append(new_stub)
            released.wait(10)
            return False
        return True

    sup.admin.load = load
    killed = []
    monkeypatch.setattr(supervisor.LaunchWatch, "hung", lambda self, stubs: list(stubs))
    monkeypatch.setattr(
        supervisor.LaunchWatch, "kill", staticmethod(lambda stubs, what: (killed.append((what, [s.pid for s in stubs])), released.set()))
    )
    server._children[0].dead = True  # prefill's stub dies; the new one's launch hangs
    started = time.monotonic()
    sup.poll()
    assert killed == [("prefill", [400])] and loads == ["prefill", "prefill"]
    assert time.monotonic() - started < 5
    assert sup.restarts["prefill"] == 1


def test_a_stop_ends_the_wait_for_a_load(watched):
    """SIGTERM while a reload hangs: the launcher stops waiting (it used to block in the load for up to 900 s)."""
    sup, server = watched.sup, watched.server
    sup.poll()
    never = threading.Event()
    sup.admin.load = lambda model, timeout: never.wait(60)
    server._children[1]._children[0].dead = True
    threading.Timer(0.3, sup.stop.set).start()
    started = time.monotonic()
    sup.poll()
    assert time.monotonic() - started < 3
    never.set()


def test_waited_on_names_the_child_a_process_blocks_in_waitpid_on():
    parent = subprocess.Popen(
        [sys.executable, "-c", "import os, subprocess; c = subprocess.Popen(['sleep', '30']); print(c.pid, flush=True); os.waitpid(c.pid, 0)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        child = int(parent.stdout.readline())
        deadline = time.monotonic() + 5
        while supervisor.waited_on(parent.pid) != {child}:
            assert time.monotonic() < deadline, supervisor.waited_on(parent.pid)
            time.sleep(0.05)
        assert supervisor.waited_on(os.getpid()) == set()  # pytest waits on nobody
        watch = supervisor.LaunchWatch(parent.pid, hung_after_s=0.3)
        stub, other = psutil.Process(child), psutil.Process(os.getpid())
        assert watch.hung([stub, other]) == []  # not for long enough yet
        time.sleep(0.4)
        assert watch.hung([stub, other]) == [stub]  # waited on all along; the other never
    finally:
        for p in psutil.Process(parent.pid).children():
            p.kill()
        parent.kill()
        parent.wait()


def test_nothing_is_killed_when_whom_tritonserver_waits_for_cannot_be_read(monkeypatch, caplog):
    monkeypatch.setattr(supervisor, "waited_on", lambda pid: None)  # ptrace-restricted /proc/.../syscall
    watch = supervisor.LaunchWatch(12345, hung_after_s=0.0)
    me = psutil.Process(os.getpid())
    assert watch.hung([me]) == [] and watch.hung([me]) == []
    assert caplog.text.count("a hung stub launch will not be detected") == 1


def test_a_killed_servers_processes_and_files_are_removed_by_the_next_launcher():
    # A "server" whose leader is gone but whose child lives on in its group,
    # as vLLM's engine core outlives a SIGKILLed tritonserver.
    leader = subprocess.Popen(["sh", "-c", "sleep 300 & echo $!"], stdout=subprocess.PIPE, start_new_session=True)
    orphan = int(leader.stdout.readline())
    leader.wait()
    tag = str(leader.pid)  # a dead pid, as a dead launcher's
    noted = f"/dev/shm/psm_hetserve_test_{os.getpid()}"
    prefixed = f"/dev/shm/{shm.server_prefix(tag)}llm-slot-1-0"
    for path in (noted, prefixed):
        open(path, "wb").close()
    with open(shm.notes_path(tag), "w") as f:
        json.dump({"server_pid": leader.pid, "files": [noted]}, f)
    try:
        removed = clean_dead_servers()
        assert {noted, prefixed, shm.notes_path(tag)} <= set(removed)
        deadline = time.monotonic() + 10
        while psutil.pid_exists(orphan) and psutil.Process(orphan).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the orphan was not killed"
            time.sleep(0.1)
    finally:
        for path in (noted, prefixed, shm.notes_path(tag)):
            if os.path.exists(path):
                os.unlink(path)
        if psutil.pid_exists(orphan):
            os.kill(orphan, 9)


def test_a_live_servers_files_are_left_alone():
    import sys

    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "hetserve"])
    mine = f"/dev/shm/{shm.server_prefix(str(launcher.pid))}llm-slot-1-0"
    open(mine, "wb").close()
    try:
        deadline = time.monotonic() + 10  # until exec, the child's command line is pytest's
        while "hetserve" not in " ".join(psutil.Process(launcher.pid).cmdline()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert mine not in clean_dead_servers()
        assert os.path.exists(mine)
    finally:
        launcher.kill()
        launcher.wait()
        os.unlink(mine)


def test_too_little_shm_is_refused_with_what_to_change(monkeypatch):
    monkeypatch.setattr(os, "statvfs", lambda d: SimpleNamespace(f_bavail=64, f_frsize=1 << 20))
    with pytest.raises(ConfigError, match=r"has 64 MiB free; this configuration needs \d+ MiB.*--shm-size"):
        check_shm_capacity(largest_kv=32 << 20, slot_bytes=1 << 30)
    monkeypatch.setattr(os, "statvfs", lambda d: SimpleNamespace(f_bavail=512, f_frsize=1 << 20))
    check_shm_capacity(largest_kv=1 << 20, slot_bytes=64 << 20)  # 512 MiB is enough for that


def test_command_restricts_shared_memory_and_repository_apis(tmp_path):
    options = ServeOptions(admin_key="k3y")
    cmd = server_command(TritonInstall.find(), options, tmp_path, tmp_path, largest_kv=1 << 20, region_prefix="p_")
    assert "--model-control-mode=explicit" in cmd and "--load-model=*" in cmd
    assert "--grpc-restricted-protocol=shared-memory,model-repository:hetserve-admin-key=k3y" in cmd
    assert "--http-restricted-api=shared-memory,model-repository:hetserve-admin-key=k3y" in cmd


def test_model_parameters_reach_the_run_repository_and_unknown_ones_are_refused(tmp_path, model_path):
    from hetserve.cli import parser, _model_parameters

    args = parser().parse_args(["serve", "--model-parameter", "llm:request_timeout_s=5", "--model-parameter", "prefill:max_queued_requests=3"])
    options = ServeOptions(model=str(model_path), parameters=_model_parameters(args.model_parameter))
    prepare_repository(options, tmp_path / "repo", gpu=False)
    from test_launcher import config

    assert config(tmp_path / "repo", "llm").parameters["request_timeout_s"].string_value == "5"
    assert config(tmp_path / "repo", "prefill").parameters["max_queued_requests"].string_value == "3"
    with pytest.raises(ConfigError, match="llm has no parameter 'request_timeout'"):
        prepare_repository(ServeOptions(model=str(model_path), parameters={"llm": {"request_timeout": "5"}}), tmp_path / "b", gpu=False)
    with pytest.raises(ConfigError, match="no model called decode"):
        prepare_repository(ServeOptions(model=str(model_path), parameters={"decode": {"x": "1"}}), tmp_path / "c", gpu=False)


def test_the_server_dies_with_a_killed_launcher():
    """tritonserver is started with PR_SET_PDEATHSIG: a SIGKILLed launcher takes it along."""
    import sys

    launcher = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, sys, time; from hetserve.launcher import _die_with_parent; "
         "p = subprocess.Popen(['sleep', '300'], preexec_fn=_die_with_parent); print(p.pid, flush=True); time.sleep(300)"],
        stdout=subprocess.PIPE, text=True,
    )
    server = int(launcher.stdout.readline())
    assert psutil.pid_exists(server)
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 10
    while psutil.pid_exists(server) and psutil.Process(server).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the server outlived its launcher"
        time.sleep(0.1)
