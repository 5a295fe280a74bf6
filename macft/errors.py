"""Errors the user can fix; the CLI prints them as one line instead of a traceback."""


class ModelLoadError(ValueError):
    """A model or adapter path/id that cannot be loaded."""


class TrainingError(RuntimeError):
    """A run that cannot go on (no trainable parameters, non-finite loss, bad checkpoint)."""
