"""What one peer can hold, on real sockets: idle TCP connections, silent associations, a peer stalled inside a PDU,
too many connections from one address; and a slow but steady sender that must still succeed."""

from __future__ import annotations

import socket
import struct
import time

import pydicom
import pytest
from conftest import SAMPLES
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.transport import AssociationSocket
from test_receiver import queued, receiver  # noqa: F401 - the in-process receiver fixture

from triage_node.audit import read

#: Generous bound for "the node let go": the timeouts under test are 1-2 s; a miss here means "never".
LET_GO_S = 20.0


def fresh(i: int = 0) -> pydicom.Dataset:
    ds = pydicom.dcmread(SAMPLES[i])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def closed_by_peer(sock: socket.socket, within: float = LET_GO_S) -> bool:
    """True when the node closes (or resets) the connection; reads and discards whatever it sends first."""
    sock.settimeout(within)
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


def assoc_count(server) -> int:
    return len(server.active_associations)


def wait_count(server, n: int, within: float = LET_GO_S) -> int:
    deadline = time.monotonic() + within
    while assoc_count(server) != n and time.monotonic() < deadline:
        time.sleep(0.05)
    return assoc_count(server)


def test_idle_tcp_connection_is_closed_after_acse_timeout(receiver):  # noqa: F811
    cfg, _, server = receiver(receiver={"acse_timeout": 1.0})
    raw = socket.create_connection(("127.0.0.1", cfg.receiver.port))
    try:
        assert closed_by_peer(raw), "an idle TCP connection kept its association slot"
    finally:
        raw.close()
    assert wait_count(server, 0) == 0


def test_peer_stalled_inside_a_pdu_is_let_go(receiver):  # noqa: F811
    """A-ASSOCIATE-RQ header announcing 1000 bytes, 10 sent, then silence: pynetdicom alone blocks in recv() with
    no timeout (its kill() then waits for that thread for ever); the socket timeout ends it."""
    cfg, _, server = receiver(receiver={"acse_timeout": 1.0, "network_timeout": 1.0})
    raw = socket.create_connection(("127.0.0.1", cfg.receiver.port))
    try:
        raw.sendall(struct.pack(">BBI", 0x01, 0x00, 1000) + b"\x00\x01" + b"\x00" * 8)
        assert closed_by_peer(raw)
    finally:
        raw.close()
    assert wait_count(server, 0) == 0


def test_silent_association_is_aborted_after_idle_timeout(receiver):  # noqa: F811
    cfg, _, server = receiver(receiver={"network_timeout": 1.0})
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(str(fresh().SOPClassUID), [str(fresh().file_meta.TransferSyntaxUID)])
    ae.network_timeout = None  # the requestor itself never times out: only the node can end it
    assoc = ae.associate("127.0.0.1", cfg.receiver.port, ae_title="TRIAGE")
    assert assoc.is_established
    deadline = time.monotonic() + LET_GO_S
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not assoc.is_established and assoc.is_aborted
    assert wait_count(server, 0) == 0


def test_connections_per_address_are_capped(receiver):  # noqa: F811
    cfg, spool, server = receiver(receiver={"max_associations_per_address": 2, "acse_timeout": 30.0})
    held = [socket.create_connection(("127.0.0.1", cfg.receiver.port)) for _ in range(2)]
    try:
        assert wait_count(server, 2) == 2
        third = socket.create_connection(("127.0.0.1", cfg.receiver.port))
        try:
            assert closed_by_peer(third, within=5.0), "a third connection from the same address was kept"
        finally:
            third.close()
        ds = fresh()
        from test_receiver import store

        assert store(cfg.receiver.port, ds) is None  # refused while the two idle ones hold the address's slots
        refused = [e for e in read(cfg.audit_log) if e["event"] == "connection_refused"]
        assert refused and refused[-1]["peer"] == "127.0.0.1" and "concurrent associations" in refused[-1]["reason"]
    finally:
        for s in held:
            s.close()
    assert wait_count(server, 0) == 0  # a peer that hangs up frees its slot at once, not after acse_timeout
    from test_receiver import store

    assert store(cfg.receiver.port, fresh(1)) == 0x0000  # the address is served again


class TrickleSocket(AssociationSocket):
    """Sends every PDU in 4 KB pieces, 50 ms apart: ~2 s for one CXR, twice the node's idle timeout."""

    def send(self, bytestream: bytes) -> None:
        for i in range(0, len(bytestream), 4096):
            super().send(bytestream[i:i + 4096])
            if len(bytestream) > 4096:
                time.sleep(0.05)


@pytest.mark.parametrize("max_pdu", [0, 16384])
def test_slow_but_steady_sender_succeeds(receiver, redis_url, max_pdu):  # noqa: F811
    """One large PDU trickling (max_pdu 0: the node accepts any PDU size) and many small PDUs trickling: both take
    longer than the idle timeout in total and must still be stored, queued and acknowledged."""
    cfg, spool, _ = receiver(receiver={"network_timeout": 1.0, "max_pdu": max_pdu})
    ds = fresh(2)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(str(ds.SOPClassUID), [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", cfg.receiver.port, ae_title="TRIAGE")
    assert assoc.is_established
    assoc.dul.socket.__class__ = TrickleSocket
    t0 = time.monotonic()
    try:
        status = assoc.send_c_store(ds)
    finally:
        if assoc.is_established:
            assoc.release()
    assert time.monotonic() - t0 > cfg.receiver.network_timeout  # the test really outlasted the idle timeout
    assert int(status.Status) == 0x0000
    assert spool.instance_path(str(ds.SOPInstanceUID)).exists()
    assert len(queued(redis_url)) == 1
