"""Client for hetserve's ``llm`` model (the Triton vLLM backend interface)."""

from hetserve_client.client import Completion, Delta, generate_http, scrape_metrics, stream_grpc, wait_ready

__all__ = ["Completion", "Delta", "generate_http", "scrape_metrics", "stream_grpc", "wait_ready"]
