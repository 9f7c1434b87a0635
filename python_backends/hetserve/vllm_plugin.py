"""hetserve's vLLM general plugin (entry point ``vllm.general_plugins``, pyproject.toml).

vLLM loads general plugins in each of its processes (engine core and every
worker) before any model runs. This one makes bfloat16 work on x86 CPUs with
AMX tiles: vLLM's CPU attention then takes its "amx" kernel path, but nothing
in vLLM 0.32 asks Linux for the AMX tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM)``),
which a process must do before its first AMX instruction. Without it the
worker dies with SIGILL (exit code -4) at its first bfloat16 attention, even
in a plain vLLM engine. ``torch.cpu._init_amx()`` asks for it. Elsewhere it
does nothing.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def register() -> None:
    import torch

    supported = getattr(torch.cpu, "_is_amx_tile_supported", None)
    init = getattr(torch.cpu, "_init_amx", None)
    if supported is None or init is None or not supported():
        return
    if not init():
        logger.warning("this CPU has AMX tiles but the kernel refused them: bfloat16 attention may crash (SIGILL)")
