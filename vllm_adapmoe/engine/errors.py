"""The one error type for bad settings, shared by the engine and the plugin's settings parser
(``vllm_adapmoe.config`` re-exports it), so the engine needs nothing from the plugin."""


class AdapMoEConfigError(ValueError):
    """A bad ``adapmoe`` setting; the message says which key and how to fix it."""


class ExpertCopyError(RuntimeError):
    """An expert copy to the device failed twice, or did not finish within ``copy_timeout_s``:
    the step ends with this error (vLLM then fails the step's requests) instead of hanging or
    computing from a slot that was never filled."""
