"""Errors the engine reports to the user's process."""


class EngineDeadError(RuntimeError):
    """The engine core or one of its workers died; pending requests cannot finish.

    The `LLM` that raised it must be recreated.
    """


class EngineStartupError(RuntimeError):
    """An engine process failed before it was ready."""
