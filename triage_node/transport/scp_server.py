"""The receiver's association server: several processes on one port, and bounds on what one peer can hold.

pynetdicom's ``ThreadedAssociationServer`` with four changes:

* **One port, several processes.** The listening socket is created once (``listen_socket``) and inherited by every
  receiver process; each accepts from the same kernel queue. A process already serving associations waits a
  moment before accepting (``busy_defer_s`` per active association, as nginx's ``accept_disabled`` does), so idle
  processes take new associations first and the load spreads by how busy each process is, not by a hash. A
  killed process loses nothing queued: the socket stays open in the others. ``reuse_port`` is the alternative
  (each process binds its own ``SO_REUSEPORT`` socket; the kernel spreads connections by a hash of the addresses).
* **Bounded per peer.** At most ``max_per_address`` concurrent connections from one IP address per process; more
  are closed at once, before any DICOM processing, with an audit line.
* **Idle peers let go.** The accepted socket times out after ``idle_timeout`` without a byte (a peer that stops
  inside a PDU no longer holds the association thread for ever), and every chunk received restarts pynetdicom's
  idle timer, so a slow but steady sender of one large PDU is not cut off while an idle one is.
* **Shorter polling.** The DUL reactor polls its queues every 0.2 ms instead of 1 ms while data flows, and the
  association serves back-to-back requests without returning to its reactor loop (which sleeps 1 ms per turn).
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import time
from typing import Any

from pynetdicom.transport import (
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

log = logging.getLogger(__name__)
#: Seconds between DUL reactor polls while data flows (pynetdicom's default is 1 ms for every association), when
#: idle, and how long after the last data the fast polling lasts.
DUL_LOOP_DELAY = 0.0002
IDLE_LOOP_DELAY = 0.001
FAST_WINDOW_S = 0.1
#: Longest wait for a DIMSE message in one turn of the association's reactor loop.
REACTOR_WAIT_S = 0.005


class ReceiverSocket(AssociationSocket):
    """Receives in large chunks straight into the PDU buffer; each chunk counts as activity for the idle timer.

    The DUL polls every ``DUL_LOOP_DELAY`` while data arrived in the last ``FAST_WINDOW_S``, else every 1 ms as
    pynetdicom does (fast polling of an idle association costs ~10 % of a core)."""

    @property
    def ready(self) -> bool:
        ready = bool(AssociationSocket.ready.fget(self))  # type: ignore[attr-defined]
        now = time.monotonic()
        if ready:
            self.assoc.dul._run_loop_delay = DUL_LOOP_DELAY
            self.__dict__["_last_data"] = now
        elif now - self.__dict__.get("_last_data", 0.0) > FAST_WINDOW_S:
            self.assoc.dul._run_loop_delay = IDLE_LOOP_DELAY
        return ready

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        assert sock is not None
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        timer = self.assoc.dul._idle_timer
        got = 0
        while got < nr_bytes:
            n = sock.recv_into(view[got:], nr_bytes - got)
            if not n:  # connection closed by the peer: what we have so far, as pynetdicom does
                del view
                return buf[:got]
            got += n
            timer.restart()
        return buf


def _closing_aware_receive(dul: Any) -> Any:
    """``dul.receive_pdu`` that stops waiting for the A-ASSOCIATE-RQ once the peer has closed the connection.

    pynetdicom's acceptor waits the whole ``acse_timeout`` for the request even when the DUL has already seen the
    connection close (Sta2 -> Sta1, its thread ends), so a peer that connects and hangs up held a slot for that long."""
    original = dul.receive_pdu

    def receive_pdu(wait: bool = False, timeout: float | None = None) -> Any:
        if not wait or timeout is None:
            return original(wait, timeout)
        deadline = time.monotonic() + timeout
        while True:
            primitive = original(True, min(0.1, max(deadline - time.monotonic(), 0.0)))
            sock = dul.socket.socket if dul.socket else None
            gone = not dul.is_alive() or sock is None or sock.fileno() == -1
            if primitive is not None or time.monotonic() >= deadline or gone:
                return primitive

    return receive_pdu


def _waiting_get_msg(dimse: Any) -> Any:
    """``dimse.get_msg`` for the acceptor's reactor loop, which polls with ``block=False`` after a 1 ms sleep: wait
    up to ``REACTOR_WAIT_S`` instead, so a complete C-STORE request is served the moment it is decoded (the release
    and abort checks of the loop then run every few ms, as often as they need)."""
    msg_queue = dimse.msg_queue

    def get_msg(block: bool = False) -> Any:
        try:
            return msg_queue.get(block=True, timeout=dimse.dimse_timeout if block else REACTOR_WAIT_S)
        except queue.Empty:
            return None, None

    return get_msg


def _streaming_serve(assoc: Any) -> Any:
    """``assoc._serve_request`` that, once a request is answered, serves the next one as soon as the DUL has decoded
    it (waiting up to ``REACTOR_WAIT_S``), instead of going back to the acceptor's reactor loop, whose every turn
    starts with a 1 ms sleep: at one association that sleep was a tenth of the time per instance. When no request
    follows in time, the loop resumes and does its release, abort, DUL and idle checks as before."""
    serve = assoc._serve_request
    msg_queue = assoc.dimse.msg_queue

    def serve_request(msg: Any, context_id: int) -> None:
        while True:
            serve(msg, context_id)
            if assoc._kill or not assoc.is_established or not assoc.dul.is_alive():
                return
            try:
                context_id, msg = msg_queue.get(block=True, timeout=REACTOR_WAIT_S)
            except queue.Empty:
                return
            if msg is None:
                return

    return serve_request


class ReceiverRequestHandler(RequestHandler):
    def _create_association(self) -> Any:
        assoc = super()._create_association()
        setattr(assoc.dimse, "get_msg", _waiting_get_msg(assoc.dimse))  # noqa: B010 - instance override
        setattr(assoc, "_serve_request", _streaming_serve(assoc))  # noqa: B010 - instance override
        assoc.dul.socket.__class__ = ReceiverSocket  # same object, recv() replaced (a subclass adding no state)
        assoc.dul._run_loop_delay = DUL_LOOP_DELAY
        setattr(assoc.dul, "receive_pdu", _closing_aware_receive(assoc.dul))  # noqa: B010 - instance override
        return assoc


def listen_socket(host: str, port: int, reuse_port: bool = False, backlog: int = 128) -> socket.socket:
    """A bound, listening TCP socket to hand to ``ReceiverServer`` (and to inherit in child processes)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


class ReceiverServer(ThreadedAssociationServer):
    """See the module docstring. Extra keywords: ``sock`` (a listening socket from ``listen_socket``),
    ``idle_timeout``, ``max_per_address``, ``busy_defer_s`` and ``on_refused(peer, reason)``."""

    daemon_threads = True

    def __init__(self, ae: Any, address: tuple[str, int], ae_title: str, contexts: list, ssl_context: Any = None,
                 evt_handlers: list | None = None, *, sock: socket.socket, idle_timeout: float | None = None,
                 max_per_address: int = 0, busy_defer_s: float = 0.002, on_refused: Any = None) -> None:
        self._listen = sock
        self.idle_timeout = idle_timeout
        self.max_per_address = max_per_address
        self.busy_defer_s = busy_defer_s
        self.on_refused = on_refused
        super().__init__(ae, address, ae_title, contexts, ssl_context, evt_handlers=evt_handlers,
                         request_handler=ReceiverRequestHandler)

    @property
    def listener(self) -> socket.socket:
        return self._listen

    def server_bind(self) -> None:
        if self.socket is not None:
            self.socket.close()  # the one TCPServer created; ours is already bound and listening
        self.socket = self._listen
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        pass

    def _taken_by_another(self) -> bool:
        """Wait while busy so that an idle process accepts first; True when the connection was taken meanwhile."""
        busy = len(self.active_associations)
        if busy == 0:
            return False
        deadline = time.monotonic() + min(self.busy_defer_s * busy, 0.02)
        while time.monotonic() < deadline:
            time.sleep(self.busy_defer_s / 4)
            if not select.select([self.listener], [], [], 0)[0]:
                return True
        return False

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        if self._taken_by_another():
            raise BlockingIOError("taken by another receiver process")
        client, address = self.listener.accept()  # BlockingIOError (an OSError) when another process was quicker
        client.setblocking(True)
        client.settimeout(self.idle_timeout)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if self.max_per_address <= 0:
            return True
        host = client_address[0]
        held = sum(1 for a in self.active_associations if a.requestor.address == host)
        if held < self.max_per_address:
            return True
        log.warning("refused a connection from %s: %d associations already open from that address", host, held)
        if self.on_refused:
            self.on_refused(host, f"more than {self.max_per_address} concurrent associations from one address")
        return False

    def server_close(self) -> None:
        try:
            self.listener.close()  # never shutdown(): the listening socket may be shared with other processes
        except OSError:
            pass
