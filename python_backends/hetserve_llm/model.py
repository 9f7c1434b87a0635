"""Triton entry point of the `llm` model; the logic is in hetserve.triton.llm."""

import locale

# The stub leaves LC_CTYPE="C", and importing torch/vLLM then fails on non-ASCII
# paths; this must run before those imports.
locale.setlocale(locale.LC_CTYPE, "C.UTF-8")


class TritonPythonModel:
    def initialize(self, args):
        from hetserve.triton.common import setup_logging
        from hetserve.triton.llm import LLMModel

        setup_logging()
        self._model = LLMModel(args)

    async def execute(self, requests):
        await self._model.execute(requests)

    def finalize(self):
        self._model.finalize()
