"""The project's error types: each message is one line naming the file, field or value at fault."""


class AtomsError(Exception):
    """Base class; command-line entry points print these as one line and exit non-zero."""


class InputError(AtomsError, ValueError):
    """Data of the wrong shape, dtype or content (NaN/Inf, empty, mismatched width)."""


class SingularMomentError(InputError):
    """A second moment that cannot be inverted without a floor."""


class ConfigError(AtomsError, ValueError):
    """A configuration field with a missing, unknown or invalid value."""


class TrainingDiverged(AtomsError, RuntimeError):
    """A non-finite loss or weight appeared during training; ``step`` is the first bad step."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step

    def __reduce__(self):
        return type(self), (str(self), self.step)


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a
    one-line error quotes of a library's failure."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
