"""Error hierarchy; raised inside, translated only at the edges (DIMSE status, task retry, CLI exit code)."""


class TriageError(Exception):
    """Base of every error the node raises on purpose."""


class NotEligible(TriageError):
    """The instance is valid DICOM but not a frontal chest radiograph we process (acknowledged, recorded)."""


class BadDataset(TriageError):
    """The instance cannot be read or decoded (truncated, no pixel data, invalid header)."""


class SendFailed(TriageError):
    """A result could not be delivered. ``retryable`` tells the task whether to try again."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class ModelError(TriageError):
    """A model package is missing, corrupt (checksum mismatch) or incompatible."""


class SpoolError(TriageError):
    """The spool cannot accept the instance (disk full, unwritable, invalid UID)."""


class InstanceUnavailable(TriageError):
    """A worker on another host could not fetch the instance from the receiver's instance server (down,
    unreachable, token refused). Retried with backoff like any transient failure, then dead-lettered."""
