"""A user-space netfilter queue (NFQUEUE) in pure Python, over a raw netlink socket.

iptables' ``NFQUEUE`` target hands packets to a process, which must give each
one a verdict (accept or drop).  The kernel holds a queued packet until its
verdict arrives, so a process that gives verdicts late delays packets, and one
that gives them out of order reorders them.  That is how the link shaper
(``shaper.py``) delays and reorders traffic on kernels without ``sch_netem``.

This module owns only the netlink protocol (``linux/netfilter/nfnetlink_queue.h``):
binding a queue number, reading packet ids with the first bytes of each packet
(the IP header, to learn the destination), and sending verdicts.  No library
and no compiled binding are needed: only ``AF_NETLINK`` sockets, which every
Linux has.  Queues belong to a network namespace; ``open_in_netns`` creates the
socket inside a named one (``ip netns add NAME``) without moving the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

NETLINK_NETFILTER: Final = 12
NFNL_SUBSYS_QUEUE: Final = 3
NFQNL_MSG_PACKET: Final = 0
NFQNL_MSG_VERDICT: Final = 1
NFQNL_MSG_CONFIG: Final = 2
NLM_F_REQUEST: Final = 0x1
NLM_F_ACK: Final = 0x4
NLMSG_ERROR: Final = 0x2
NLMSG_DONE: Final = 0x3

NFQA_PACKET_HDR: Final = 1
NFQA_VERDICT_HDR: Final = 2
NFQA_PAYLOAD: Final = 10
NFQA_CFG_CMD: Final = 1
NFQA_CFG_PARAMS: Final = 2
NFQA_CFG_QUEUE_MAXLEN: Final = 3
NFQA_CFG_MASK: Final = 4
NFQA_CFG_FLAGS: Final = 5
NFQNL_CFG_CMD_BIND: Final = 1
NFQNL_CFG_CMD_UNBIND: Final = 2
NFQNL_COPY_PACKET: Final = 2
NFQA_CFG_F_FAIL_OPEN: Final = 1 << 0
NFQA_CFG_F_GSO: Final = 1 << 2

NF_DROP: Final = 0
NF_ACCEPT: Final = 1

CLONE_NEWNET: Final = 0x40000000
NETNS_DIR: Final = "/run/netns"

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid (host order)
_NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (big-endian value packed by hand)
_NLATTR = struct.Struct("=HH")


class NfqueueError(OSError):
    """The kernel refused a queue command (no NFQUEUE support, queue taken, no permission)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Packet:
    """A queued packet: its id (for the verdict) and its first bytes (the IP header)."""

    queue: int
    packet_id: int
    head: bytes

    @property
    def src(self) -> str | None:
        """Source IPv4 address, or None for anything else."""
        if len(self.head) >= 20 and self.head[0] >> 4 == 4:
            return socket.inet_ntoa(self.head[12:16])
        return None

    @property
    def dst(self) -> str | None:
        """Destination IPv4 address, or None for anything else."""
        if len(self.head) >= 20 and self.head[0] >> 4 == 4:
            return socket.inet_ntoa(self.head[16:20])
        return None


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attr(kind: int, payload: bytes) -> bytes:
    raw = _NLATTR.pack(_NLATTR.size + len(payload), kind) + payload
    return raw + b"\0" * (_align(len(raw)) - len(raw))


def _attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while pos + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, pos)
        if length < _NLATTR.size:
            return
        yield kind & 0x3FFF, data[pos + _NLATTR.size: pos + length]
        pos += _align(length)


class Queue:
    """One netlink socket bound to one or more queue numbers of one namespace."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.queues: list[int] = []
        self._seq = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        for q in self.queues:
            with contextlib.suppress(OSError):
                self._config(q, _attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_UNBIND, 0, 0)), ack=False)
        self.sock.close()

    def _message(self, msg_type: int, queue: int, payload: bytes, flags: int) -> bytes:
        self._seq += 1
        body = _NFGENMSG.pack(socket.AF_UNSPEC, 0, socket.htons(queue)) + payload
        kind = (NFNL_SUBSYS_QUEUE << 8) | msg_type
        return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, self._seq, 0) + body

    def _config(self, queue: int, payload: bytes, *, ack: bool = True) -> None:
        flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
        self.sock.send(self._message(NFQNL_MSG_CONFIG, queue, payload, flags))
        if not ack:
            return
        for _ in range(100):  # skip queued packets until our acknowledgement
            data = self.sock.recv(65536)
            pos = 0
            while pos + _NLMSGHDR.size <= len(data):
                length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, pos)
                if kind == NLMSG_ERROR and seq == self._seq:
                    (code,) = struct.unpack_from("=i", data, pos + _NLMSGHDR.size)
                    if code:
                        raise NfqueueError(-code, f"nfqueue {queue}: {os.strerror(-code)}")
                    return
                pos += _align(max(length, _NLMSGHDR.size))
        raise NfqueueError(errno.EIO, f"nfqueue {queue}: no acknowledgement from the kernel")

    def bind(self, queue: int, *, copy_bytes: int = 20, maxlen: int = 20_000) -> None:
        """Bind a queue number; packets arrive with their first ``copy_bytes`` bytes.
        Fail-open: when the queue is full the kernel accepts instead of dropping."""
        self._config(queue, _attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, 0)))
        self.queues.append(queue)
        self._config(queue, _attr(NFQA_CFG_PARAMS, struct.pack("!IB", copy_bytes, NFQNL_COPY_PACKET)))
        self._config(queue, _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", maxlen)))
        flags = NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO
        self._config(queue, _attr(NFQA_CFG_MASK, struct.pack("!I", flags)) + _attr(NFQA_CFG_FLAGS,
                                                                                    struct.pack("!I", flags)))

    def read(self) -> list[Packet]:
        """The packets of one receive (non-blocking socket: [] when none are waiting)."""
        try:
            data = self.sock.recv(1 << 20)
        except BlockingIOError:
            return []
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:  # the kernel dropped messages we were too slow for
                return []
            raise
        out: list[Packet] = []
        pos = 0
        while pos + _NLMSGHDR.size <= len(data):
            length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, pos)
            if length < _NLMSGHDR.size:
                break
            if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                start = pos + _NLMSGHDR.size
                (res_id,) = struct.unpack_from("!H", data, start + 2)
                packet_id: int | None = None
                head = b""
                for attr, value in _attrs(data[start + _NFGENMSG.size: pos + length]):
                    if attr == NFQA_PACKET_HDR:
                        (packet_id,) = struct.unpack_from("!I", value)
                    elif attr == NFQA_PAYLOAD:
                        head = value
                if packet_id is not None:
                    out.append(Packet(queue=res_id, packet_id=packet_id, head=head))
            pos += _align(length)
        return out

    def verdict(self, packet: Packet, verdict: int) -> None:
        payload = _attr(NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet.packet_id))
        try:
            self.sock.send(self._message(NFQNL_MSG_VERDICT, packet.queue, payload, NLM_F_REQUEST))
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOBUFS):  # the packet is gone already
                raise


def _new_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.bind((0, 0))
    for opt in (33, socket.SO_RCVBUF):  # 33: SO_RCVBUFFORCE (root), else the capped one
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, 8 << 20)
            break
    return sock


@contextlib.contextmanager
def _in_netns(name: str) -> Iterator[None]:
    """Run the block with this thread in network namespace ``name``, then come back."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
        try:
            yield
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns back from {name}: {os.strerror(err)}")
    finally:
        os.close(target)
        os.close(own)


def open_queue(netns: str | None, queue: int) -> Queue:
    """A non-blocking queue socket bound to ``queue`` in ``netns`` (None: this namespace)."""
    if netns is None:
        sock = _new_socket()
    else:
        with _in_netns(netns):
            sock = _new_socket()
    q = Queue(sock)
    try:
        q.bind(queue)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return q
