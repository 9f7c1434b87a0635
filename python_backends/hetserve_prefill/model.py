"""Triton entry point of the `prefill` model; the logic is in hetserve.triton.prefill."""

import locale

# The stub leaves LC_CTYPE="C", and importing torch/vLLM then fails on non-ASCII
# paths; this must run before those imports.
locale.setlocale(locale.LC_CTYPE, "C.UTF-8")


class TritonPythonModel:
    def initialize(self, args):
        from hetserve import setup_logging
        from hetserve.triton.prefill import PrefillModel

        setup_logging()
        self._model = PrefillModel(args)

    def execute(self, requests):
        self._model.execute(requests)  # responses are sent from the engine loop

    def finalize(self):
        self._model.finalize()
