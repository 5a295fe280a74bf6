"""Errors the user can fix; the CLI prints them as one line instead of a traceback."""


class ModelLoadError(ValueError):
    """A model or adapter path/id that cannot be loaded."""


class TrainingError(RuntimeError):
    """A run that cannot go on (no trainable parameters, non-finite loss, bad checkpoint)."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped a run after a checkpoint; the CLI exits with ``exit_code`` (130 for
    SIGINT, 143 for SIGTERM) and prints the message, which says how to resume."""

    def __init__(self, message: str, exit_code: int = 130, checkpoint=None):
        super().__init__(message)
        self.exit_code = exit_code
        self.checkpoint = checkpoint
