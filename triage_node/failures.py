"""What to do with an exception nobody foresaw: a reason safe to record, and whether trying again may help.

Every task turns any exception into an audit line with its stage and :func:`describe`'s reason, then retries it
:func:`attempts_allowed` times at most (counted durably per SOP Instance UID by :class:`~triage_node.spool.Spool`,
so a re-enqueue does not start the count again) and dead-letters it with ``reason.json``.
"""

from __future__ import annotations

import traceback
from pathlib import Path

from .errors import BadDataset, InstanceUnavailable, NotEligible, SendFailed, TriageError

#: Errors of the environment that a later attempt may not meet: disk, sockets, broker, memory.
_TRANSIENT = (OSError, MemoryError)
_TRANSIENT_MODULES = ("redis", "kombu", "amqp", "billiard", "urllib3", "requests", "socket", "ssl")
#: Errors of the data or of the code: the same input fails the same way every time.
_DETERMINISTIC = (BadDataset, NotEligible, ValueError, TypeError, AttributeError, LookupError, ArithmeticError,
                  NotImplementedError, AssertionError, RecursionError)
#: Tries for an exception that is neither (a RuntimeError from a library, say): one more, in case it was a fluke.
UNKNOWN_TRIES = 2


def is_transient(exc: BaseException) -> bool:
    """True when a later attempt may succeed (environment), False for data or code errors."""
    if isinstance(exc, SendFailed):
        return exc.retryable
    if isinstance(exc, (*_TRANSIENT, InstanceUnavailable)):  # the receiver's instance server may come back
        return True
    return type(exc).__module__.split(".")[0] in _TRANSIENT_MODULES


def attempts_allowed(exc: BaseException, max_attempts: int) -> int:
    """How many attempts in all an instance failing this way gets (``retry.max_attempts`` for transient ones)."""
    if is_transient(exc):
        return max(1, max_attempts)
    if isinstance(exc, (*_DETERMINISTIC, SendFailed)):  # a SendFailed not retryable: the peer refused for good
        return 1
    return max(1, min(UNKNOWN_TRIES, max_attempts))


def describe(exc: BaseException) -> str:
    """A reason fit for the audit trail and the log: UIDs and reasons, never values.

    Our own errors carry reasons written for that. For any other exception the message may quote the data (a
    patient's name in a ValueError), so only its type, the attribute or key it names, and where it was raised go
    in: ``AttributeError 'PatientBirthDate' at highdicom/sr/sop.py:184 (__init__)``.
    """
    if isinstance(exc, TriageError):
        return str(exc)
    name = type(exc).__name__
    if isinstance(exc, AttributeError) and getattr(exc, "name", None):
        name += f" '{exc.name}'"
    elif isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], (int, str)) and len(str(exc.args[0])) < 48:
        name += f" {exc.args[0]!r}"  # a tag or a keyword
    elif isinstance(exc, OSError) and exc.strerror:
        name += f" ({exc.strerror})"
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]
        parts = Path(last.filename).parts
        where = "/".join(parts[parts.index("site-packages") + 1:] if "site-packages" in parts else parts[-2:])
        name += f" at {where}:{last.lineno} ({last.name})"
    return name
