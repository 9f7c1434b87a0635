"""Triton glue: the only modules that import ``triton_python_backend_utils``."""
