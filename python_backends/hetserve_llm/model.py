"""Triton entry point of the `llm` model (the decode tier); the logic is in hetserve.triton.llm."""

import locale

# The stub leaves LC_CTYPE="C", and importing torch/vLLM then fails on non-ASCII
# paths; this must run before those imports.
locale.setlocale(locale.LC_CTYPE, "C.UTF-8")


class TritonPythonModel:
    def initialize(self, args):
        from hetserve import setup_logging
        from hetserve.triton.llm import LLMModel

        setup_logging()
        self._model = LLMModel(args)

    def execute(self, requests):
        self._model.execute(requests)  # responses are sent from the engine loop

    def finalize(self):
        self._model.finalize()
