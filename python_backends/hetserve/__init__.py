"""hetserve: disaggregated prefill/decode serving on Triton, with vLLM engines."""

__version__ = "0.1.0"


def setup_logging() -> None:
    """Send hetserve's log records to stderr: the server's log, from a stub or an engine's worker."""
    import logging

    logger = logging.getLogger("hetserve")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
