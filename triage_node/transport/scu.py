"""A fix for pynetdicom's association requestor: a DIMSE response must reach the ``send_*`` call that waits for it.

The race (pynetdicom 3.0, ``association.py``). A requestor association runs its own reactor loop
(``Association._run_reactor``, in the association's thread), which takes any complete DIMSE message off
``dimse.msg_queue`` with ``get_msg(block=False)`` and serves it as a request from the peer. A ``send_c_store`` pauses
that loop first: it clears ``_reactor_checkpoint`` and waits until ``_is_paused`` is True. But the loop sets
``_is_paused = True`` *before* ``_reactor_checkpoint.wait()`` and back to False only *after* it returns. When the
loop has just passed ``wait()`` (the checkpoint was set: in its idle turn, or woken by the end of the previous send)
and its thread is preempted before ``_is_paused = False``, the sender sees a stale True, sends its request and blocks
in ``get_msg(block=True)``; the DUL thread queues the response; the loop then runs again, takes the response, logs
"Received unexpected C-STORE service message" and drops it. The sender waits its whole DIMSE timeout, then aborts.
Under CPU load (two busy loops on two cores) that was ~1 C-STORE in 3,000, with any SCP: on the wire the response
left the SCP within 2 ms of the request (``docs/performance.md``).

The fix, per association (:func:`guard_responses`): the loop's non-blocking ``get_msg`` takes only a message that is
not a response (a request from the peer, what the loop exists to serve) and leaves responses, and the
``(None, None)`` that the state machine queues when the association is aborted or closed, to the blocking
``get_msg`` of the ``send_*`` call. The check and the take are one step under the queue's lock. The blocking
``get_msg`` is pynetdicom's, and records whether it ended by the DIMSE timeout (:attr:`ResponseGuard.timed_out`)
rather than by an abort or a closed connection.
"""

from __future__ import annotations

import queue
from typing import Any

__all__ = ["ResponseGuard", "guard_of", "guard_responses"]


class ResponseGuard:
    """What :func:`guard_responses` installed on one association."""

    def __init__(self, dimse: Any) -> None:
        self.dimse = dimse
        #: The last blocking wait for a message ended by the DIMSE timeout (no response, no abort).
        self.timed_out = False

    def get_msg(self, block: bool = False) -> tuple[Any, Any]:
        q = self.dimse.msg_queue
        if block:
            self.timed_out = False
            try:
                return q.get(block=True, timeout=self.dimse.dimse_timeout)
            except queue.Empty:
                self.timed_out = True
                return None, None
        with q.mutex:  # the association's reactor loop: a request from the peer only, never a response
            if q.queue:
                context_id, msg = q.queue[0]
                if msg is not None and getattr(msg, "MessageIDBeingRespondedTo", None) is None:
                    q.queue.popleft()
                    q.not_full.notify()
                    return context_id, msg
        return None, None


def guard_responses(assoc: Any) -> ResponseGuard:
    """Install the fix on an established requestor association (before its first ``send_*``) and return it.

    Replaces ``assoc.dimse.get_msg`` on the instance (the reactor looks it up on every turn). Idempotent."""
    current = getattr(assoc.dimse.get_msg, "__self__", None)
    if isinstance(current, ResponseGuard):
        return current
    guard = ResponseGuard(assoc.dimse)
    setattr(assoc.dimse, "get_msg", guard.get_msg)  # noqa: B010 - instance override
    return guard


def guard_of(assoc: Any) -> ResponseGuard | None:
    """The guard installed on ``assoc``, if any."""
    current = getattr(assoc.dimse.get_msg, "__self__", None)
    return current if isinstance(current, ResponseGuard) else None
