"""hetserve bench serve: latency statistics, vLLM's stream chunks, the report."""

from __future__ import annotations

import json

import pytest

from hetserve.bench import serve


def test_ttft_and_inter_token_gaps():
    t = serve.Timing(sent=10.0, arrivals=[(10.5, 1), (10.6, 1), (10.6, 0), (10.9, 3)])
    assert t.tokens == 5
    assert t.ttft() == pytest.approx(0.5)
    # a response of k tokens is k gaps of its delay / k; an empty one is no gap
    assert t.gaps() == pytest.approx([0.1, 0.1, 0.1, 0.1])


def test_percentiles_interpolate_between_ranks():
    assert serve.percentile([3, 1, 2, 4], 50) == pytest.approx(2.5)
    assert serve.percentile([5.0], 99) == 5.0
    assert serve.percentile(list(range(101)), 99) == pytest.approx(99)


def test_summary_counts_tokens_over_the_wall_time():
    timings = [serve.Timing(0.0, [(0.1, 1), (0.2, 1)]), serve.Timing(0.0, [(0.3, 1), (0.4, 1)])]
    row = serve.summarize(timings, wall_s=0.5)
    assert row["output_tok_per_s"] == 8.0 and row["requests"] == 2
    assert row["ttft_ms_p50"] == pytest.approx(200.0)
    assert row["itl_ms_p50"] == pytest.approx(100.0)


def test_sse_lines_of_a_vllm_completion_stream():
    chunk = {"choices": [{"index": 0, "text": " the", "token_ids": [17, 18]}]}
    assert serve.sse_tokens(b"data: " + json.dumps(chunk).encode() + b"\n") == 2
    assert serve.sse_tokens(b'data: {"choices": [{"text": "x"}]}\n') == 1  # no token ids: one per chunk
    assert serve.sse_tokens(b"data: [DONE]\n") is None
    assert serve.sse_tokens(b"\n") is None
    assert serve.sse_tokens(b'data: {"choices": [], "usage": {}}\n') is None


def test_report_has_every_row_and_a_plot_per_metric(tmp_path):
    rows = [
        {"system": s, "model": "m", "concurrency": c, "requests": 4, "ttft_ms_p50": 10.0 * c, "ttft_ms_p99": 20.0 * c,
         "itl_ms_p50": 1.0, "itl_ms_p99": 2.0, "output_tok_per_s": 100.0 * c}
        for s in ("llm", "unified") for c in (1, 8)
    ]
    serve.write_report(rows, tmp_path, "t")
    assert json.loads((tmp_path / "results.json").read_text()) == rows
    report = (tmp_path / "report.md").read_text()
    assert report.count("\n| llm |") == 2 and report.count("\n| unified |") == 2
    for metric in ("ttft_ms_p50", "itl_ms_p50", "output_tok_per_s"):
        png = tmp_path / f"{metric}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({metric}.png)" in report


def test_the_vllm_pd_peer_sends_a_request_as_vllms_proxy_does():
    """Prefill gets max_tokens 1 and do_remote_decode; decode streams with what prefill returned."""
    import asyncio

    import aiohttp
    from aiohttp import web

    from hetserve.bench import peer

    seen = []

    async def prefill(request):
        body = await request.json()
        seen.append(("prefill", body))
        return web.json_response({"choices": [{"text": "x"}], "kv_transfer_params": {"remote_block_ids": [3], "remote_engine_id": "p"}})

    async def decode(request):
        seen.append(("decode", await request.json()))
        response = web.StreamResponse()
        await response.prepare(request)
        for ids in ([5], [6, 7]):
            await response.write(b"data: " + json.dumps({"choices": [{"text": "t", "token_ids": ids}]}).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    async def run():
        runners = []
        addresses = []
        for handler in (prefill, decode):
            app = web.Application()
            app.router.add_post("/v1/completions", handler)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            runners.append(runner)
            addresses.append(f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}")
        try:
            async with aiohttp.ClientSession() as session:
                return await peer.request(session, *addresses, "bench", "a prompt", 3)
        finally:
            for runner in runners:
                await runner.cleanup()

    timing = asyncio.run(run())
    assert timing.tokens == 3
    (_, first), (_, second) = seen
    assert first["max_tokens"] == 1 and first["kv_transfer_params"] == {"do_remote_decode": True} and not first["stream"]
    assert second["kv_transfer_params"] == {"remote_block_ids": [3], "remote_engine_id": "p"}
    assert second["stream"] and second["max_tokens"] == 3 and second["prompt"] == first["prompt"] == "a prompt"


def test_the_peers_side_channel_port_is_outside_the_ephemeral_range():
    """Starting vLLM binds random ephemeral ports itself; the side channel's must not be one of them."""
    import socket

    from hetserve.bench.peer import side_channel_port

    low, _high = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    port = side_channel_port()
    assert 1024 < port < low or low <= 1025
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free
