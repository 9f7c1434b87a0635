"""Which engines run without torch.compile (engine.eager_cpu_env)."""

from hetserve.engine import eager_cpu_env

SPIN = {"GOMP_SPINCOUNT": "20000"}


def test_an_eager_cpu_engine_runs_without_the_compiler():
    assert eager_cpu_env({"enforce_eager": True}, SPIN, on_cpu=True) == {**SPIN, "TORCH_COMPILE_DISABLE": "1"}


def test_compiled_models_gpus_and_a_users_choice_are_left_alone():
    assert eager_cpu_env({"enforce_eager": False}, SPIN, on_cpu=True) == SPIN
    assert eager_cpu_env({}, SPIN, on_cpu=True) == SPIN  # vLLM's default compiles the model
    assert eager_cpu_env({"enforce_eager": True}, SPIN, on_cpu=False) == SPIN
    mine = {"TORCH_COMPILE_DISABLE": "0"}
    assert eager_cpu_env({"enforce_eager": True}, mine, on_cpu=True) == mine
