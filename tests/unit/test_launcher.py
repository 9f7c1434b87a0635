"""The launcher's run repository, command line and clean-up, without a server."""

import json
import os
import shutil
from pathlib import Path

import pytest

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from hetserve import names, shm
from hetserve.launcher import ServeOptions, TritonInstall, assemble_backends, prepare_repository, remove_shm, server_command, serves_metrics


def config(repo, model):
    return text_format.Parse((repo / model / "config.pbtxt").read_text(), mc.ModelConfig())


def kv_type(cfg):
    return {t.name: t.data_type for t in [*cfg.input, *cfg.output]}[names.KV_CACHE]


def test_run_repository_adapts_to_a_cpu_machine(tmp_path, caplog, model_path):
    caplog.set_level("INFO")
    options = ServeOptions()  # the built-in checkpoint, served in its recipe's float32
    largest = prepare_repository(options, tmp_path / "repo", gpu=False)
    repo = tmp_path / "repo"
    prefill = config(repo, "prefill")
    assert prefill.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert "no GPU is visible, placing it on KIND_CPU" in caplog.text
    # the default model is float32: 4 layers * 2 * 2 heads * 64 * 4 bytes per token
    assert largest == 2048 * 4 * 2 * 2 * 64 * 4
    assert kv_type(prefill) == kv_type(config(repo, "llm")) == mc.TYPE_FP32
    assert json.loads((repo / "llm" / "1" / "model.json").read_text())["model"] == str(model_path)


def test_gpu_machine_keeps_the_gpu_placement(tmp_path, model_path):
    prepare_repository(ServeOptions(model=str(model_path)), tmp_path / "repo", gpu=True)
    assert config(tmp_path / "repo", "prefill").instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU


def test_command_binds_loopback_and_sizes_shared_memory(tmp_path):
    triton = TritonInstall.find()
    options = ServeOptions(http_port=1, grpc_port=2, metrics_port=3)
    cmd = server_command(triton, options, tmp_path, tmp_path, largest_kv=100 << 20, region_prefix="p_")
    for flag in ("--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1", "--http-port=1"):
        assert flag in cmd
    pairs = [a.split(",", 1)[1].split("=") for a in cmd if a.startswith("--backend-config=python,shm-")]
    sizes = {key: int(value) for key, value in pairs if value.isdigit()}
    assert sizes["shm-default-byte-size"] >= 2 * (100 << 20)
    assert sizes["shm-growth-byte-size"] >= 100 << 20


def test_backend_directory_holds_python_and_the_backends(tmp_path):
    root = assemble_backends(TritonInstall.find(), tmp_path / "backends")
    assert (root / "python" / "libtriton_python.so").is_file()
    assert os.access(root / "python" / "triton_python_backend_stub", os.X_OK)
    for model in names.Model:
        assert (root / f"hetserve_{model.value}" / "model.py").is_file()


def test_remove_shm_removes_only_its_prefixes():
    # Server 123's prefix must not match server 1234's files.
    mine, other = "/dev/shm/hetserve-123-slot-1", "/dev/shm/hetserve-1234-slot-1"
    for path in (mine, other):
        open(path, "wb").close()
    try:
        assert remove_shm([shm.server_prefix("123")]) == [mine]
        assert os.path.exists(other) and not os.path.exists(mine)
    finally:
        for path in (mine, other):
            if os.path.exists(path):
                os.unlink(path)


def test_shm_mapped_by_finds_this_process_mappings():
    from hetserve.kv.slots import map_file
    from hetserve.launcher import shm_mapped_by

    path = f"/dev/shm/hetserve-test-mapped-{os.getpid()}"
    try:
        with open(path, "wb") as f:
            f.truncate(4096)
        mapping = map_file(path, 4096)
        assert path in shm_mapped_by(os.getpid())
        del mapping
    finally:
        os.unlink(path)


def test_command_line_overrides_reach_the_run_repository(tmp_path, model_path):
    options = ServeOptions(
        model=str(model_path), kv_transport="tensor", remote_prefill_min_tokens=7, engine_args={"max_num_seqs": 3}
    )
    prepare_repository(options, tmp_path / "repo", gpu=False)
    params = config(tmp_path / "repo", "llm").parameters
    assert (params["kv_transport"].string_value, params["remote_prefill_min_tokens"].string_value) == ("tensor", "7")
    for model in ("llm", "prefill"):
        assert json.loads((tmp_path / "repo" / model / "1" / "model.json").read_text())["max_num_seqs"] == 3


def test_engine_args_parse_as_json_or_strings():
    from hetserve.cli import parser

    args = parser().parse_args(["serve", "--engine-arg", "max-num-seqs=8", "--engine-arg", "dtype=bfloat16"])
    assert dict(args.engine_arg) == {"max_num_seqs": 8, "dtype": "bfloat16"}


def test_settings_come_from_the_checkpoint_unless_set(tmp_path):
    from hetserve.checkpoint import TinyRecipe, build_tiny
    from hetserve.launcher import engine_settings, model_facts

    ckpt = build_tiny(tmp_path / "ckpt", TinyRecipe(max_position_embeddings=1024, dtype="bfloat16"))
    args = engine_settings(ServeOptions(model=str(ckpt)), names.Model.LLM)
    assert "max_model_len" not in args and "dtype" not in args  # the model's own
    fingerprint, max_len = model_facts(args)
    assert (fingerprint.dtype, max_len) == ("bfloat16", 1024)
    shorter = engine_settings(ServeOptions(model=str(ckpt), engine_args={"max_model_len": 512}), names.Model.LLM)
    assert model_facts(shorter)[1] == 512
    assert engine_settings(ServeOptions(), names.Model.LLM)["dtype"] == "float32"  # the built-in recipe's


def test_impossible_settings_are_refused_before_start(tmp_path, model_path):
    from hetserve.launcher import ConfigError

    too_long = ServeOptions(model=str(model_path), engine_args={"max_model_len": 4096})
    with pytest.raises(ConfigError, match="max_model_len"):
        prepare_repository(too_long, tmp_path / "a", gpu=False)
    repo = tmp_path / "repo"
    shutil.copytree(ServeOptions().model_repository, repo)
    prefill_json = repo / "prefill" / "1" / "model.json"
    prefill_json.write_text(json.dumps({**json.loads(prefill_json.read_text()), "dtype": "bfloat16"}))
    with pytest.raises(ConfigError, match="dtype: prefill 'bfloat16', llm 'float32'"):
        prepare_repository(ServeOptions(model_repository=repo), tmp_path / "b", gpu=False)


def test_sizes_parse_with_units():
    from hetserve.cli import parse_bytes, parser

    assert parse_bytes("4GiB") == 4 << 30 and parse_bytes("512MiB") == 512 << 20
    assert parse_bytes("1.5G") == 1_500_000_000 and parse_bytes("1000") == 1000
    args = parser().parse_args(["serve", "--dtype", "bfloat16", "--max-model-len", "900", "--kv-cache-memory", "1GiB"])
    from hetserve.cli import _engine_args

    assert _engine_args(args) == {"dtype": "bfloat16", "max_model_len": 900, "kv_cache_memory_bytes": 1 << 30}


def test_a_context_longer_than_the_models_stops_hetserve_serve_with_a_message(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "hetserve.cli", "serve", "--max-model-len", "4096", "--http-port", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2
    assert "max_model_len" in done.stderr and "4096" in done.stderr
    assert "starting" not in done.stderr  # refused before any server started


def test_unsupported_architectures_are_refused_by_name(monkeypatch, model_path):
    from types import SimpleNamespace

    from vllm.engine.arg_utils import EngineArgs

    from hetserve.launcher import ConfigError, model_facts

    fake = SimpleNamespace(
        is_attention_free=False, is_hybrid=False, use_mla=True, is_multimodal_model=False,
        architectures=["DeepseekV2ForCausalLM"],
    )
    monkeypatch.setattr(EngineArgs, "create_model_config", lambda self: fake)
    with pytest.raises(ConfigError, match="DeepseekV2ForCausalLM is not supported.*MLA"):
        model_facts({"model": str(model_path)})


def test_models_serves_part_of_the_repository(tmp_path, model_path):
    from hetserve.launcher import ConfigError, ServeOptions, engine_models, prepare_repository

    prepare_repository(ServeOptions(model=str(model_path), models=["prefill"]), tmp_path / "node", gpu=False)
    assert engine_models(tmp_path / "node") == ["prefill"]  # a prefill node: no llm, no decode engine
    assert not (tmp_path / "node" / "llm").exists()
    prepare_repository(ServeOptions(model=str(model_path), models=["llm"]), tmp_path / "decode", gpu=False)
    assert engine_models(tmp_path / "decode") == ["llm"]
    repository = Path(__file__).resolve().parents[2] / "model_repository"
    assert engine_models(repository) == ["prefill", "llm"]  # the unified baseline only when named
    assert engine_models(repository, ["unified"]) == ["unified"]
    assert engine_models(repository, ["llm", "unified", "prefill"]) == ["prefill", "unified", "llm"]
    with pytest.raises(ConfigError, match="--models: decode not in"):
        prepare_repository(ServeOptions(model=str(model_path), models=["decode"]), tmp_path / "bad", gpu=False)
    # One entrypoint for every pool: settings of a model served elsewhere are ignored, unknown ones refused.
    prepare_repository(ServeOptions(model=str(model_path), models=["prefill"], parameters={"llm": {"x": "1"}}), tmp_path / "b2", gpu=False)
    with pytest.raises(ConfigError, match="no model called decode"):
        prepare_repository(ServeOptions(model=str(model_path), models=["prefill"], parameters={"decode": {"x": "1"}}), tmp_path / "b3", gpu=False)


def test_a_python_environment_is_checked_before_start(tmp_path, model_path):
    import sys
    import venv

    from hetserve.launcher import ConfigError, ServeOptions, check_python_env, prepare_repository

    found = check_python_env(Path(sys.prefix))  # the launcher's own passes
    assert found["prefix"] == sys.prefix and found["vllm"] and found["missing"] == []
    bare = tmp_path / "bare"
    venv.create(bare, with_pip=False)
    with pytest.raises(ConfigError, match=f"{bare} cannot run a hetserve model: no vllm, torch, numpy, hetserve"):
        check_python_env(bare)
    with pytest.raises(ConfigError, match="is not a Python environment.*scripts/setup.sh"):
        check_python_env(tmp_path / "nowhere")
    options = ServeOptions(model=str(model_path), python_envs={"prefill": Path(sys.prefix)})
    prepare_repository(options, tmp_path / "repo", gpu=False)
    assert config(tmp_path / "repo", "prefill").parameters["EXECUTION_ENV_PATH"].string_value == sys.prefix
    assert "EXECUTION_ENV_PATH" not in config(tmp_path / "repo", "llm").parameters
    with pytest.raises(ConfigError, match="no model called decode"):
        prepare_repository(ServeOptions(model=str(model_path), python_envs={"decode": bare}), tmp_path / "r2", gpu=False)


def test_an_ngc_images_tritonserver_is_used_when_named(tmp_path, monkeypatch):
    from hetserve.launcher import TRITON_ROOT_ENV

    root = tmp_path / "opt" / "tritonserver"
    monkeypatch.setenv(TRITON_ROOT_ENV, str(root))
    with pytest.raises(RuntimeError, match="bin/tritonserver is missing"):
        TritonInstall.find()
    for path in ("bin/tritonserver", "backends/python/libtriton_python.so", "backends/python/triton_python_backend_stub"):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).touch()
    found = TritonInstall.find()
    assert found.binary == root / "bin" / "tritonserver"
    assert found.stub == root / "backends" / "python" / "triton_python_backend_stub"
    monkeypatch.delenv(TRITON_ROOT_ENV)
    assert "pytriton" in str(TritonInstall.find().binary)  # the wheel's, as on the development machines


def test_an_unknown_transfer_dtype_is_refused_before_start(tmp_path, model_path):
    from hetserve.launcher import ConfigError

    options = ServeOptions(model=str(model_path), parameters={"llm": {"kv_transfer_dtype": "int4"}})
    with pytest.raises(ConfigError, match="llm: unknown KV transfer dtype 'int4'; expected one of auto, float16"):
        prepare_repository(options, tmp_path / "repo", gpu=False)
    prepare_repository(ServeOptions(model=str(model_path), parameters={"llm": {"kv_transfer_dtype": "int8"}}), tmp_path / "ok", gpu=False)
    assert config(tmp_path / "ok", "llm").parameters["kv_transfer_dtype"].string_value == "int8"


def test_metrics_port_counts_only_when_it_answers():
    """Readiness waits for the metrics service too: Triton binds it after HTTP says ready."""
    import http.server
    import threading

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/metrics" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    with http.server.HTTPServer(("127.0.0.1", 0), Metrics) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        port = httpd.server_address[1]
        assert serves_metrics("127.0.0.1", port)
        httpd.shutdown()
    assert not serves_metrics("127.0.0.1", port)  # nothing listens there now


def test_engine_env_is_checked_before_start_and_reaches_the_config(tmp_path, model_path):
    """engine_env must be a JSON object of strings; the repository's own value parses."""
    from hetserve.engine import engine_env
    from hetserve.launcher import ConfigError

    for i, (bad, why) in enumerate((('{"GOMP_SPINCOUNT": 20000}', "JSON object of strings"), ("GOMP_SPINCOUNT=1", "not JSON"), ('["a"]', "JSON object"))):
        options = ServeOptions(model=str(model_path), parameters={"llm": {"engine_env": bad}})
        with pytest.raises(ConfigError, match=f"llm: engine_env .*{why}"):
            prepare_repository(options, tmp_path / f"bad{i}", gpu=False)
    prepare_repository(ServeOptions(model=str(model_path), parameters={"prefill": {"engine_env": '{"OMP_WAIT_POLICY": "PASSIVE"}'}}), tmp_path / "ok", gpu=False)
    assert engine_env(config(tmp_path / "ok", "prefill").parameters["engine_env"].string_value) == {"OMP_WAIT_POLICY": "PASSIVE"}
    # the shipped default: every engine's idle OpenMP threads spin briefly (README "Tuning")
    shipped = {m: engine_env(config(ServeOptions().model_repository, m).parameters["engine_env"].string_value) for m in ("llm", "unified", "prefill")}
    assert shipped == {m: {"GOMP_SPINCOUNT": "20000"} for m in shipped}


def test_stream_interval_is_checked_before_start_and_shipped_auto(tmp_path, model_path):
    from hetserve.launcher import ConfigError

    with pytest.raises(ConfigError, match="llm: stream_interval must be 'auto' or a whole number"):
        prepare_repository(ServeOptions(model=str(model_path), parameters={"llm": {"stream_interval": "0"}}), tmp_path / "bad", gpu=False)
    prepare_repository(ServeOptions(model=str(model_path), parameters={"llm": {"stream_interval": "4"}}), tmp_path / "ok", gpu=False)
    assert config(tmp_path / "ok", "llm").parameters["stream_interval"].string_value == "4"
    shipped = {m: config(ServeOptions().model_repository, m).parameters["stream_interval"].string_value for m in ("llm", "unified")}
    assert shipped == {"llm": "auto", "unified": "auto"}


def test_a_kv_cache_too_small_for_the_context_is_raised_or_refused_before_start(tmp_path, model_path, caplog):
    """vLLM refuses an engine whose KV cache cannot hold one full-context sequence, late; here it is
    decided before start: the repository's default is raised to fit, a size the user gave is refused."""
    from hetserve.launcher import ConfigError, engine_settings, model_facts

    fingerprint, max_len = model_facts(engine_settings(ServeOptions(model=str(model_path)), names.Model.LLM))
    need = fingerprint.bytes_per_token * (max_len + 128)  # vLLM: the context's blocks of 128 and a null block
    small = int(need // 4)
    with pytest.raises(ConfigError, match=r"less than one sequence of its context .*--kv-cache-memory \d+MiB or more, or --max-model-len \d+ or less"):
        prepare_repository(ServeOptions(model=str(model_path), engine_args={"kv_cache_memory_bytes": small}), tmp_path / "a", gpu=False)
    # a shorter context that fits is taken as given
    fits = ServeOptions(model=str(model_path), engine_args={"kv_cache_memory_bytes": small, "max_model_len": max_len // 8})
    prepare_repository(fits, tmp_path / "b", gpu=False)
    assert json.loads((tmp_path / "b" / "llm" / "1" / "model.json").read_text())["kv_cache_memory_bytes"] == small
    repo = tmp_path / "repo"  # a repository whose default is too small, as model.json's is for a big checkpoint
    shutil.copytree(ServeOptions().model_repository, repo)
    for model in ("llm", "prefill"):
        path = repo / model / "1" / "model.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "kv_cache_memory_bytes": small}))
    prepare_repository(ServeOptions(model_repository=repo, model=str(model_path)), tmp_path / "c", gpu=False)
    for model in ("llm", "prefill"):
        raised = json.loads((tmp_path / "c" / model / "1" / "model.json").read_text())["kv_cache_memory_bytes"]
        assert raised >= need and raised % (1 << 20) == 0
    assert "raised to" in caplog.text
    with pytest.raises(ConfigError, match="kv_cache_memory_bytes must be a positive whole number of bytes, got '4GiB'"):
        prepare_repository(ServeOptions(model=str(model_path), engine_args={"kv_cache_memory_bytes": "4GiB"}), tmp_path / "d", gpu=False)


def test_the_kv_size_check_is_vllms_blocks_and_null_block():
    """vLLM needs cdiv(context, block) + 1 blocks: not a token less is accepted, not a token more asked."""
    from hetserve.kv.format import ModelFingerprint
    from hetserve.launcher import ConfigError, fit_kv_cache

    fp = ModelFingerprint("LlamaForCausalLM", 32, 8, 128, "{}", "bfloat16")  # 128 KiB per token
    block = 128 * fp.bytes_per_token  # 16 MiB
    for max_len, blocks in ((4096, 33), (4097, 34), (512, 5), (100, 2)):
        fit_kv_cache("llm", {"model": "m", "kv_cache_memory_bytes": blocks * block}, fp, max_len, True, 2)  # fits
        with pytest.raises(ConfigError, match=f"holds {(blocks - 2) * 128} tokens"):
            fit_kv_cache("llm", {"model": "m", "kv_cache_memory_bytes": blocks * block - 1}, fp, max_len, True, 2)
    args = {"model": "m", "kv_cache_memory_bytes": 256 << 20}  # the default: 16 blocks, 1,920 tokens (vLLM said so)
    with pytest.raises(ConfigError, match="holds 1920 tokens"):
        fit_kv_cache("llm", dict(args), fp, 4096, True, 2)
    fit_kv_cache("llm", args, fp, 4096, False, 2)
    assert args["kv_cache_memory_bytes"] == 34 * block  # raised: the context, the null block and one spare


def test_a_checkpoint_without_a_tokenizer_is_refused_before_start(tmp_path, model_path):
    from hetserve.launcher import ConfigError

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (bare / name).symlink_to(model_path / name)
    with pytest.raises(ConfigError, match=f"vLLM cannot load the tokenizer of {bare}: "):
        prepare_repository(ServeOptions(model=str(bare)), tmp_path / "run", gpu=False)


def test_a_port_in_use_stops_hetserve_serve_before_it_starts_a_server():
    """Not "ready" because another server (one still stopping, say) answers on that port."""
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "hetserve.cli", "serve", "--grpc-port", str(port)],
            capture_output=True, text=True, timeout=300,
        )
    assert done.returncode == 2
    assert f"the grpc port 127.0.0.1:{port} is already in use" in done.stderr and "--grpc-port" in done.stderr
    assert "starting" not in done.stderr
