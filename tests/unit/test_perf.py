"""hetserve bench perf: perf_analyzer's input data, its CSV, its libraries."""

from __future__ import annotations

import json

import pytest

from hetserve.bench import perf
from hetserve.sampling import parse_json, to_sampling_params

# What perf_analyzer 2.51 writes with -f (streaming, a decoupled model).
CSV = """Concurrency,Inferences/Second,Response Throughput,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency
8,10.1016,332.289,0,687560,666,32,278,6,0,621688,1052374,1708493,1601918
1,3.10408,102.241,0,300000,600,30,270,5,0,323645,340000,350000,370490
"""


def test_csv_rows_are_read_by_concurrency():
    rows = perf.parse_csv(CSV)
    assert [r["concurrency"] for r in rows] == [1, 8]
    assert rows[1] == {
        "concurrency": 8, "requests_per_s": 10.1016, "responses_per_s": 332.289,
        "latency_us_p50": 621688, "latency_us_p99": 1601918,
    }


def test_a_csv_without_a_needed_column_is_refused_by_name():
    with pytest.raises(ValueError, match="p99 latency"):
        perf.parse_csv(CSV.replace("p99 latency", "p98 latency"))


def test_input_data_sends_numbers_as_strings_that_the_models_accept():
    data = perf.input_data(["a b c", "d e"], max_tokens=17)
    assert [d["text_input"] for d in data["data"]] == [["a b c"], ["d e"]]
    assert all(d["stream"] == [True] for d in data["data"])
    raw = data["data"][0]["sampling_parameters"][0]
    assert json.loads(raw)["max_tokens"] == "17"  # as genai-perf sends it
    params = to_sampling_params(parse_json(raw.encode()))
    assert (params.max_tokens, params.temperature, params.ignore_eos) == (17, 0.0, True)


def test_libraries_are_linked_by_soname(tmp_path):
    libs = tmp_path / "nvidia_pytriton.libs"
    libs.mkdir()
    (libs / "libb64-98cb6333.so.0d").write_bytes(b"b64")
    (libs / "libcudart-09529672.so.12.6.77").write_bytes(b"cudart")
    target = tmp_path / "lib"
    perf.link_libraries(libs, target)
    perf.link_libraries(libs, target)  # again: replaces, does not fail
    assert (target / "libb64.so.0d").read_bytes() == b"b64"
    assert (target / "libcudart.so.12").read_bytes() == b"cudart"


def test_a_missing_library_is_named(tmp_path):
    (tmp_path / "libs").mkdir()
    with pytest.raises(FileNotFoundError, match="libb64.so.0d"):
        perf.link_libraries(tmp_path / "libs", tmp_path / "lib")
