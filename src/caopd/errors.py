"""User-facing errors: one line that names the file, row and field, mapped to exit code 2 by the CLI."""

from __future__ import annotations


class CaopdInputError(ValueError):
    """Bad input (dataset, completion file, config, checkpoint) that the user must fix.

    The message is a single line: ``FILE: row N: field 'F': what is wrong (and what to do)``. ``row`` is
    the record's 0-based index in the dataset, as ``datasets`` and pandas index it (blank JSONL lines do
    not count); errors in a JSONL file's text also name its 1-based ``line``.
    """

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
                 field: str | None = None) -> None:
        self.file, self.row, self.field, self.detail = file, row, field, message
        parts = []
        if file is not None:
            parts.append(str(file))
        if row is not None:
            parts.append(f"row {row}")
        if field is not None:
            parts.append(f"field '{field}'")
        parts.append(message)
        super().__init__(": ".join(parts).replace("\n", " "))


class TrainingStopped(RuntimeError):
    """Training stopped before its last step and can be resumed: preempted (SIGTERM) after saving a checkpoint, or
    a non-finite loss or gradient, with the last good checkpoint kept. The CLI exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class TrainingJobFailed(RuntimeError):
    """The training job on the cluster (TrainJob / PyTorchJob) failed or ran out of time: the message carries its
    condition and the last lines of its failed trainer's output. The CLI exits with code 1."""


class CaopdServiceError(RuntimeError):
    """A remote service (the KFP server, a registry) could not be reached or refused a request.

    One line saying which service, what it answered and what to check; the CLI exits with code 1.
    """
