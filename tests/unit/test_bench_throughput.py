"""hetserve bench throughput: the load per level, the offline baselines and the table."""

from hetserve.bench.throughput import offline_variants, prompt_count, table


def test_every_level_runs_several_requests_per_stream_at_low_concurrency():
    assert [prompt_count(c) for c in (1, 8, 64, 256)] == [4, 32, 64, 256]


def test_offline_runs_with_vllms_defaults_and_as_the_server_runs_its_engines():
    variants = offline_variants({"GOMP_SPINCOUNT": "20000"})
    assert variants["default"] == {}
    assert variants["as_served"] == {"GOMP_SPINCOUNT": "20000", "VLLM_CPU_NUM_OF_RESERVED_CPU": "2"}


def test_table_shows_each_measured_mode_with_its_ratio():
    rows = [
        {"concurrency": 64, "prompts": 64, "offline_tok_s": 7200.0, "llm_stream_tok_s": 2909.2, "llm_stream_ratio": 0.404,
         "llm_nonstream_tok_s": 5083.2, "llm_nonstream_ratio": 0.706},
        {"concurrency": 256, "prompts": 256, "llm_stream_tok_s": 2591.3},
    ]
    lines = table(rows, ("stream", "nonstream"), unified=False).splitlines()
    assert lines[0].count("`llm`") == 2
    assert lines[2] == "| 64 | 64 | 7,200 | 2,909 (0.40) | 5,083 (0.71) |"
    assert lines[3] == "| 256 | 256 | – | 2,591 | – |"


def test_offline_runs_at_the_served_concurrency():
    from hetserve.bench.throughput import at_concurrency

    args = {"max_num_seqs": 64, "dtype": "float32"}
    assert at_concurrency(args, 1) == {"max_num_seqs": 1, "dtype": "float32"}
    assert at_concurrency(args, 256)["max_num_seqs"] == 64  # never above the served engine's own limit
    assert args["max_num_seqs"] == 64
