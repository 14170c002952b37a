"""One error hierarchy; each class carries the exit code the CLI returns for it.

Exit codes (stable, documented in the README):
  0 success, 1 unexpected internal error, 2 usage or recipe content error,
  3 input error (missing/unreadable file, model factory, data),
  4 artifact error (wrong stage, corrupt, incompatible, output may not be replaced),
  5 numerical check failed (export parity), 6 accuracy goal not met (tune), 130 interrupted.
"""

from __future__ import annotations


class QuantCliError(Exception):
    """Base of every error quantcli reports to a user as one line."""

    exit_code = 1
    kind = "internal"

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def line(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class RecipeError(QuantCliError):
    """The recipe or a command-line option is malformed or invalid."""

    exit_code = 2
    kind = "recipe"


class InputError(QuantCliError):
    """A user-supplied file, model factory or data source cannot be used."""

    exit_code = 3
    kind = "input"


class ModelError(InputError):
    """The model factory fails, returns no module, or the model cannot be captured."""

    kind = "model"


class DataError(InputError):
    """Calibration, training or evaluation data is missing arrays or has wrong shapes."""

    kind = "data"


class ArtifactError(QuantCliError):
    """An artifact is of the wrong stage, corrupt, incompatible, or may not be replaced."""

    exit_code = 4
    kind = "artifact"


class NumericsError(QuantCliError):
    """A numerical check (ONNX Runtime parity) failed; the outputs were still written."""

    exit_code = 5
    kind = "numerics"


class GoalError(QuantCliError):
    """`tune` could not meet its accuracy goal within its trials; the best model and outcome were still written."""

    exit_code = 6
    kind = "goal"


EXIT_INTERRUPTED = 130


class Interrupted(KeyboardInterrupt):
    """An interrupt that left something to continue from (a training checkpoint): `kept` says what."""

    def __init__(self, kept: str):
        super().__init__(kept)
        self.kept = kept
