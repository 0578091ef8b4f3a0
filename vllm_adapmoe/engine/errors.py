"""The one error type for bad settings, shared by the engine and the plugin's settings parser
(``vllm_adapmoe.config`` re-exports it), so the engine needs nothing from the plugin."""


class AdapMoEConfigError(ValueError):
    """A bad ``adapmoe`` setting; the message says which key and how to fix it."""
