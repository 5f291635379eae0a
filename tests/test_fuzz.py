"""Fuzzing the protocol and the two processes that take messages from anyone: the router, and a
decode worker's KV socket. Every message type, with random field values (wrong types, huge and
non-finite numbers, long strings, deep nesting, missing and extra fields), and random bytes.
Decoding either gives a message or raises ProtocolError; handling a message never raises; and
between fuzz messages, real work still goes through. Hypothesis runs with a fixed seed and
example budget, so CI sees the same cases every time."""

import dataclasses
import math
import time
import types
import typing

import msgpack
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from serving import add_fake_workers, recording_router

from kairos.transport import protocol as p

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40), st.binary(max_size=40),
    st.sampled_from([2**63, -(2**63), 2**31, 1e308, -0.0, math.nan, "x" * 5000]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
TYPES = sorted(p.MESSAGE_TYPES)


ints = st.one_of(st.integers(-5, 600), st.sampled_from([2**63 - 1, -(2**63), 2**64 - 1, 2**31]))
floats = st.one_of(ints, st.floats(allow_nan=True, allow_infinity=True))
sampling = st.dictionaries(st.sampled_from(["max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                                            "ignore_eos", "stop_token_ids", "bogus"]), values, max_size=4)


def typed(hint):
    """Values of a field's declared type, edge cases included (what gets past decoding)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([typed(h) for h in typing.get_args(hint)])
    if origin is list:
        return st.lists(typed(typing.get_args(hint)[0]), max_size=40)
    known = {type(None): st.none(), int: ints, float: floats, bool: st.booleans(), bytes: st.binary(max_size=64),
             str: st.one_of(st.text(max_size=20), st.sampled_from(["p1", "d1", "x" * 5000])),
             dict: st.one_of(sampling, st.dictionaries(st.text(max_size=8), values, max_size=4)),
             list: st.lists(values)}
    return known.get(hint, values)


@st.composite
def message_bodies(draw):
    """A map that looks like a message of a real type: its fields, mostly of their declared
    types (edge values included) and some of any type, some dropped, maybe an extra one;
    sometimes a wrong version or type."""
    cls = p.MESSAGE_TYPES[draw(st.sampled_from(TYPES))]
    body = {"v": draw(st.sampled_from([p.PROTOCOL_VERSION] * 8 + [0, "5", None])),
            "type": draw(st.sampled_from([cls.TYPE] * 8 + ["nope", 3]))}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = draw(st.integers(0, 19))
        if kind:
            body[f.name] = draw(typed(hints[f.name]) if kind > 2 else values)
    if draw(st.integers(0, 9)) == 0:
        body[draw(st.text(max_size=8))] = draw(values)
    return body


def deeply_nested_abort(depth: int) -> bytes:
    """An abort whose request id is a list nested `depth` deep, written byte by byte (msgpack's
    own packer stops at 512)."""
    head = b"".join(msgpack.packb(x) for x in ("v", p.PROTOCOL_VERSION, "type", "abort", "request_id"))
    return b"\x83" + head + b"\x91" * depth + b"\x00"


wire = st.one_of(
    message_bodies().map(lambda body: msgpack.packb(body, use_bin_type=True)),
    st.binary(max_size=200),
    message_bodies().map(lambda body: msgpack.packb(body, use_bin_type=True)[: len(body) * 3]),  # truncated
    st.integers(1, 5000).map(deeply_nested_abort),
)


def decoded_or_none(data: bytes):
    try:
        return p.decode(data)
    except p.ProtocolError:
        return None


@SETTINGS
@seed(1)
@given(wire)
def test_decoding_anything_gives_a_message_or_a_protocol_error(data):
    msg = decoded_or_none(data)
    if msg is not None:
        wire_form = p.encode(msg)  # a message that passed round-trips unchanged (NaN included)
        assert p.encode(p.decode(wire_form)) == wire_form


@pytest.fixture(scope="module")
def router():
    router = recording_router()
    yield router
    router.ctx.destroy(linger=0)


IDENTITIES = [b"client", b"p1", b"d1", b"d1/heartbeat", b"stranger"]


@SETTINGS
@seed(2)
@given(st.lists(st.tuples(st.sampled_from(IDENTITIES), wire), min_size=1, max_size=8))
def test_the_router_survives_anything_and_still_dispatches(router, batch):
    for identity, data in batch:
        msg = decoded_or_none(data)
        if msg is not None:
            router.handle(identity, msg)
    # The fuzz may have re-registered or dropped the workers: put them back, then serve.
    add_fake_workers(router)
    router.sent.clear()
    router.handle(b"real", p.Submit("real", prompt_token_ids=[1, 2, 3], params={"max_tokens": 2}))
    dispatched = [m for who, m in router.sent if who == b"p1" and isinstance(m, p.PrefillRequest)]
    assert dispatched and dispatched[-1].prompt_token_ids == [1, 2, 3]
    router.handle(b"real", p.Abort("real"))
    assert (b"real", "real") not in router.by_client


@pytest.fixture(scope="module")
def decode_worker():
    from kairos.engine import LLM
    from kairos.transport.decode import DecodeWorker

    worker = DecodeWorker(LLM("tiny", num_kv_blocks=64, max_model_len=256), "tcp://127.0.0.1:9")
    worker.replies = []
    worker.kv_socket.send_multipart = lambda frames, *a, **k: worker.replies.append(p.decode(frames[-1]))
    worker.router.send_multipart = lambda frames, *a, **k: None
    yield worker
    worker.close()


@SETTINGS
@seed(3)
@given(st.lists(st.tuples(st.sampled_from([b"peer-a", b"peer-b"]), wire,
                          st.lists(st.binary(max_size=64), max_size=3), st.booleans()), min_size=1, max_size=8))
def test_the_decode_kv_socket_survives_anything_and_frees_what_it_reserved(decode_worker, batch):
    from kairos.transport.kv import kv_geometry

    worker = decode_worker
    geometry = kv_geometry(worker.llm.runner).to_dict()
    worker.on_hello(b"peer-a", p.KVHello("peer-a", geometry))  # one greeted peer, so offers get further
    for peer, data, frames, assigned in batch:
        msg = decoded_or_none(data)
        if msg is None:
            continue
        if isinstance(msg, p.KVOffer) and assigned:  # the router named this peer (or not)
            worker.handle_router(p.KVExpect(msg.request_id, peer.decode()))
        if isinstance(msg, p.KVHello):
            worker.on_hello(peer, msg)
        elif peer in worker.greeted and isinstance(msg, p.KVOffer):
            worker.on_offer(peer, msg)
        elif peer in worker.greeted and isinstance(msg, p.KVData):
            worker.on_data(peer, msg, frames)
        worker.tick(time.monotonic())
    # Whatever was reserved for the fuzz goes back when its peer is gone, and offers still
    # waiting for the router's word are refused when their wait is over.
    worker.tick(time.monotonic() + 60)
    assert not worker.unassigned
    for name in (b"peer-a", b"peer-b"):
        worker.handle_router(p.WorkerGone(name.decode()))
    deadline = time.monotonic() + 10
    while worker.writing and time.monotonic() < deadline:
        worker.finish_writes()
    while worker.llm.has_unfinished():
        worker.llm.abort_all()
        worker.llm.step()
    assert worker.llm.num_free_blocks == worker.llm.num_total_blocks


@SETTINGS
@seed(4)
@given(st.lists(wire, min_size=1, max_size=8))
def test_a_client_reading_anything_files_it_or_says_what_is_wrong(batch):
    """The client side of streams: whatever arrives is filed under its request, or refused
    with a ProtocolError, or (an error addressed to no request) raised as the router's word."""
    from kairos.transport.client import Client

    client = Client("tcp://127.0.0.1:9", timeout_s=0.1)
    try:
        rid = client.submit("hello", request_id="r")
        for data in batch:
            try:
                client._route(data)
            except p.ProtocolError:
                pass
            except RuntimeError as e:
                assert "rejected a message" in str(e)
        client._route(p.encode(p.Tokens(rid, 0, [5], "x", "stop")))
        assert client.tracked[rid].done
    finally:
        client.close()
