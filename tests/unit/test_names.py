"""Every config.pbtxt declares exactly the tensors hetserve.names defines."""

import json
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from hetserve import names

REPO = Path(__file__).resolve().parents[2] / "model_repository"
KV_TYPES = {"TYPE_FP32", "TYPE_FP16", "TYPE_BF16"}


def load(model: names.Model):
    return text_format.Parse((REPO / model.value / "config.pbtxt").read_text(), mc.ModelConfig())


def declared(tensors):
    # (outputs have no "optional" field)
    return {t.name: (mc.DataType.Name(t.data_type), tuple(t.dims), getattr(t, "optional", False)) for t in tensors}


@pytest.mark.parametrize("model", list(names.Model))
def test_config_matches_names(model):
    config = load(model)
    assert config.name == model.value and config.backend == f"hetserve_{model.value}"
    assert config.model_transaction_policy.decoupled
    for kind, tensors in (("inputs", config.input), ("outputs", config.output)):
        got = declared(tensors)
        assert set(got) == {spec.name for spec in names.IO[model][kind]}
        for spec in names.IO[model][kind]:
            data_type, dims, optional = got[spec.name]
            if spec.data_type == names.KV_DTYPE:
                assert data_type in KV_TYPES
            else:
                assert data_type == f"TYPE_{spec.data_type}"
            assert (dims, optional) == (spec.dims, spec.optional), spec.name


def test_placement_intent():
    assert load(names.Model.PREFILL).instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert load(names.Model.LLM).instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU


def test_engines_agree_on_the_model_and_leave_its_limits_to_it():
    prefill, llm = (json.loads((REPO / m / "1" / "model.json").read_text()) for m in ("prefill", "llm"))
    assert prefill == llm
    # Defaults only: the context length and dtype are the checkpoint's unless the user sets them.
    assert "max_model_len" not in llm and "dtype" not in llm


def test_llm_names_its_prefill_tier_and_transport():
    params = {key: value.string_value for key, value in load(names.Model.LLM).parameters.items()}
    assert params["prefill_model"] == names.Model.PREFILL.value
    assert params["kv_transport"] in ("shm", "tensor")
    assert int(params["remote_prefill_min_tokens"]) > 0


def test_llm_speaks_the_vllm_backend_interface():
    inputs = declared(load(names.Model.LLM).input)
    for name in ("text_input", "stream", "sampling_parameters", "exclude_input_in_output"):
        assert name in inputs


def test_vllm_loads_hetserves_plugin_in_every_engine_process():
    """The AMX fix (hetserve/vllm_plugin.py) reaches vLLM's workers through its plugin entry point."""
    from importlib.metadata import entry_points

    from hetserve import vllm_plugin

    plugins = {ep.name: ep for ep in entry_points(group="vllm.general_plugins")}
    assert plugins["hetserve"].load() is vllm_plugin.register
    vllm_plugin.register()  # harmless where there is no AMX; asks for the tile state where there is
