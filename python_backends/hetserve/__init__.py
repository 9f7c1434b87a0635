"""hetserve: disaggregated prefill/decode serving on Triton, with vLLM engines."""

__version__ = "0.1.0"
