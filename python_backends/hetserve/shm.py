"""Where a server's files live in /dev/shm, and how they are named: one home.

Every file a hetserve server creates in /dev/shm starts with that server's
prefix, ``hetserve-<tag>-`` (the tag is the launcher's pid). The prefix ends in
a separator, so removing the files of server 123 never touches server 1234's.
The launcher passes the prefix to every process of the server in the
environment.
"""

from __future__ import annotations

import os
import re

SHM_DIR = "/dev/shm"
PREFIX_ENV = "HETSERVE_SHM_PREFIX"
_DEFAULT_PREFIX = "hetserve-local-"


def server_prefix(tag: str) -> str:
    """The file-name prefix of the server tagged ``tag``."""
    return f"hetserve-{tag}-"


def triton_region_prefix(tag: str) -> str:
    """The prefix of the python backend's own regions (Triton adds to it)."""
    return f"triton_python_backend_hetserve_{tag}_"


def notes_path(tag: str) -> str:
    """Where the launcher of server ``tag`` lists the files its engines mapped (vLLM's random names)."""
    return os.path.join(SHM_DIR, server_prefix(tag) + "noted.json")


_TAGGED = (re.compile(r"hetserve-(\d+)-"), re.compile(r"triton_python_backend_hetserve_(\d+)_"))


def tag_of(name: str) -> str | None:
    """The launcher pid in a server file's name, if it is one."""
    for pattern in _TAGGED:
        match = pattern.match(name)
        if match:
            return match.group(1)
    return None


def current_prefix() -> str:
    """This process's server prefix (set by the launcher)."""
    return os.environ.get(PREFIX_ENV, _DEFAULT_PREFIX)


def path(name: str, directory: str = SHM_DIR) -> str:
    """The path of this server's file called ``name``."""
    return os.path.join(directory, current_prefix() + name)
