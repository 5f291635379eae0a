"""ZeroMQ sockets with the protocol's limits: bounded message sizes, no lingering on close, and
a receive that validates what arrived."""

from __future__ import annotations

import logging

import zmq

from kairos.transport.protocol import MAX_CONTROL_MESSAGE_BYTES, Error, Message, ProtocolError, decode, encode

log = logging.getLogger("kairos.transport")

DEFAULT_HOST = "127.0.0.1"  # loopback: nothing is reachable from elsewhere unless asked
DEFAULT_PORT = 7100  # the router's
DEFAULT_ROUTER = f"tcp://{DEFAULT_HOST}:{DEFAULT_PORT}"


def make_socket(ctx: zmq.Context, kind: int, max_bytes: int = MAX_CONTROL_MESSAGE_BYTES,
                identity: bytes | None = None) -> zmq.Socket:
    sock = ctx.socket(kind)
    # ZeroMQ drops any frame over this size and disconnects its sender.
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    sock.setsockopt(zmq.LINGER, 0)
    # No queue limit: at ZeroMQ's default of 1000 messages a peer, a burst of requests (or a
    # client slow to read its tokens) would have messages dropped, and a request lost without
    # a word. What is queued is what clients asked for, bounded in size message by message.
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a vanished peer raises, not drops
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    return sock


def send(sock: zmq.Socket, msg: Message, identity: bytes | None = None) -> bool:
    """Sends one message without blocking. False if the peer is gone (a ROUTER socket's peer)
    or, where a queue limit is set, not reading."""
    return _send(sock, msg, encode(msg), identity)


def broadcast(sock: zmq.Socket, msg: Message, identities) -> None:
    """Sends one message to each of these peers of a ROUTER socket, encoded once."""
    data = encode(msg)
    for identity in identities:
        _send(sock, msg, data, identity)


def _send(sock: zmq.Socket, msg: Message, data: bytes, identity: bytes | None) -> bool:
    parts = ([identity] if identity is not None else []) + [data]
    try:
        sock.send_multipart(parts, flags=zmq.NOBLOCK)
        return True
    except zmq.Again:
        log.warning("dropped a %s message: the peer is not reading (send queue full)", msg.TYPE)
    except zmq.ZMQError as e:
        if e.errno != zmq.EHOSTUNREACH:
            raise
        log.info("dropped a %s message: peer %r is gone", msg.TYPE, identity)
    return False


def send_tracked(sock: zmq.Socket, msg: Message, frames: list) -> zmq.MessageTracker | None:
    """Sends a message and raw frames zero-copy; the tracker says when ZeroMQ has let go of the
    frames' memory (so it may be reused). None if the message was dropped."""
    try:
        return sock.send_multipart([encode(msg), *frames], copy=False, track=True, flags=zmq.NOBLOCK)
    except zmq.Again:
        log.warning("dropped a %s message: the peer is not reading (send queue full)", msg.TYPE)
        return None


class Received:
    """One validated message, its sender (on ROUTER sockets) and any raw frames after it, and
    the sender's public key as CURVE authenticated it (z85 text; None without CURVE)."""

    __slots__ = ("identity", "msg", "frames", "user_id")

    def __init__(self, identity: bytes | None, msg: Message, frames: list[zmq.Frame], user_id: str | None = None):
        self.identity, self.msg, self.frames, self.user_id = identity, msg, frames, user_id


def _user_id(frame: zmq.Frame) -> str | None:
    try:
        return frame.get("User-Id") or None
    except zmq.ZMQError:  # no authentication on this connection
        return None


def recv(sock: zmq.Socket, routed: bool, max_header_bytes: int = MAX_CONTROL_MESSAGE_BYTES, max_frames: int = 1,
         max_total_bytes: int = MAX_CONTROL_MESSAGE_BYTES) -> Received | None:
    """Receives one multipart message without blocking: a header, and at most max_frames - 1
    raw frames after it, max_total_bytes in all (a control socket takes the header alone). A
    message that fails validation gets an Error reply naming the problem (where there is a
    sender to reply to) and is dropped; None then, as when nothing is waiting."""
    try:
        parts = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
    except zmq.Again:
        return None
    identity = parts.pop(0).bytes if routed else None
    try:
        if not parts:
            raise ProtocolError("malformed message: no frames")
        if len(parts) > max_frames:
            raise ProtocolError(f"a message of {len(parts)} frames; this socket takes at most {max_frames}")
        total = sum(len(part.buffer) for part in parts)
        if total > max_total_bytes:
            raise ProtocolError(f"a message of {total} bytes; this socket takes at most {max_total_bytes}")
        return Received(identity, decode(parts[0].buffer, max_header_bytes), parts[1:], _user_id(parts[0]))
    except (ProtocolError, RecursionError, MemoryError) as e:
        log.warning("rejected a message%s: %s", f" from {identity!r}" if identity else "", e)
        if routed:
            send(sock, Error(None, f"rejected: {e}"), identity)
        return None
