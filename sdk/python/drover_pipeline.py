"""Serves a Drover pipeline vertex from a Python program: a map, a sink or a source.

The agent on the task's node hands the program batches of messages over the task
socket (``DROVER_SOCKET``) and writes its answers downstream. A program calls one
function, which serves until the agent closes the connection::

    import drover_pipeline as dp

    def upper(msg):
        return [dp.Output(msg.payload.upper(), key=msg.key, tags=["upper"])]

    dp.map(upper)

``sink(fn)`` calls ``fn(batch)`` with a list of messages and takes back one result per
message: ``None`` (or ``True``) when it was written, an error string (or an
exception, or ``False``) when not. ``source(obj)`` drives an object with
``read(max, wait_seconds)`` returning a list of ``SourceMessage`` and
``ack(ids)`` called with the ids of messages now durably written downstream.

The wire format is the pipeline data protocol, version 1 (docs/data-protocol.md):
batched and binary. Standard library only; copy this file next to your program or ship
it in the job's working_dir.
"""

import json
import os
import socket
import struct
import sys

SOCKET_VAR = "DROVER_SOCKET"
VERSION = 1
MAX_FRAME = 64 << 20
MAX_HANDSHAKE_LINE = 64 << 10
# The most read batches a source keeps unacknowledged (as the Rust SDK).
MAX_UNACKED_BATCHES = 4096
# How long the agent has to answer the handshake or take a response off the socket.
AGENT_TIMEOUT = 30.0

MAP_REQUEST = 1
MAP_RESPONSE = 2
SINK_REQUEST = 3
SINK_RESPONSE = 4
READ_REQUEST = 5
READ_RESPONSE = 6
ACK_REQUEST = 7
ACK_RESPONSE = 8
ERROR = 9

_KIND_NAMES = {
    MAP_REQUEST: "MapRequest",
    MAP_RESPONSE: "MapResponse",
    SINK_REQUEST: "SinkRequest",
    SINK_RESPONSE: "SinkResponse",
    READ_REQUEST: "ReadRequest",
    READ_RESPONSE: "ReadResponse",
    ACK_REQUEST: "AckRequest",
    ACK_RESPONSE: "AckResponse",
    ERROR: "Error",
}

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_FRAME_HEAD = struct.Struct("<IB")
_BATCH_COUNT = struct.Struct("<QI")
_ID_TIME = struct.Struct("<16sq")
_READ_REQUEST = struct.Struct("<QII")


class PipelineError(Exception):
    """Serving stopped; the message says why."""


class ProtocolError(PipelineError):
    """The agent sent something that is not the data protocol."""


class Datum:
    """A message handed to a map or a sink."""

    __slots__ = ("id", "event_time", "key", "payload")

    def __init__(self, id, event_time, key, payload):
        self.id = id  # 16 bytes: the message's id in the pipeline's buffers
        self.event_time = event_time  # milliseconds since the Unix epoch
        self.key = key
        self.payload = payload

    def __repr__(self):
        return "Datum(id=%s, event_time=%d, key=%r, payload=%r)" % (
            self.id.hex(), self.event_time, self.key, self.payload)


class Output:
    """One message a map produces: a payload, with an optional key and tags."""

    __slots__ = ("payload", "key", "tags")

    def __init__(self, payload, key=b"", tags=()):
        self.payload = _as_bytes(payload, "an output's payload")
        self.key = _as_bytes(key, "an output's key")
        self.tags = [str(t) for t in tags]


class SourceMessage:
    """One message a source read. ``id`` is the source's own id or offset (bytes, may
    be empty); it comes back to ``ack`` once the message is written downstream."""

    __slots__ = ("id", "payload", "key", "event_time")

    def __init__(self, id, payload, key=b"", event_time=0):
        self.id = _as_bytes(id, "a source message's id")
        self.payload = _as_bytes(payload, "a source message's payload")
        self.key = _as_bytes(key, "a source message's key")
        self.event_time = int(event_time)


def _as_bytes(value, what):
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError("%s must be bytes or str, not %s" % (what, type(value).__name__))


class _Body:
    """Reads a frame's body field by field, refusing anything past its end."""

    __slots__ = ("buf", "pos", "kind")

    def __init__(self, buf, kind):
        self.buf = buf
        self.pos = 0
        self.kind = kind

    def _fail(self, what):
        return ProtocolError("%s frame: %s" % (_KIND_NAMES[self.kind], what))

    def take(self, n, field):
        end = self.pos + n
        if end > len(self.buf):
            raise self._fail("%s needs %d bytes but only %d remain in the frame"
                             % (field, n, len(self.buf) - self.pos))
        b = self.buf[self.pos:end]
        self.pos = end
        return b

    def unpack(self, st, field):
        return st.unpack(self.take(st.size, field))

    def bytes(self, field):
        (n,) = self.unpack(_U32, field)
        return bytes(self.take(n, field))

    def count(self, st, min_each, field):
        (n,) = self.unpack(st, field)
        left = len(self.buf) - self.pos
        if n * min_each > left:
            raise self._fail("%s is %d, which cannot fit: each takes at least %d bytes and only %d remain"
                             % (field, n, min_each, left))
        return n

    def finish(self):
        extra = len(self.buf) - self.pos
        if extra:
            raise self._fail("%d bytes left over after its last field" % extra)

    def in_messages(self):
        (batch,) = self.unpack(_U64, "batch id")
        count = self.count(_U32, 32, "count")
        messages = []
        for _ in range(count):
            mid, event_time = self.unpack(_ID_TIME, "id and event_time")
            key = self.bytes("key")
            payload = self.bytes("payload")
            messages.append(Datum(bytes(mid), event_time, key, payload))
        self.finish()
        return batch, messages


class _Session:
    """One data connection to the agent, past its handshake."""

    def __init__(self, role, path):
        path = path or os.environ.get(SOCKET_VAR)
        if not path:
            raise PipelineError(SOCKET_VAR + " is not set: this program is not running as a "
                                "Drover pipeline vertex")
        self.path = path
        self.role = role
        try:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(AGENT_TIMEOUT)
            self.sock.connect(path)
        except OSError as e:
            raise PipelineError("connecting to the task socket %s: %s" % (path, e)) from e
        # One buffered reader serves the handshake line and the frames after it, since
        # the agent may send its first request right behind its answer.
        self.reader = self.sock.makefile("rb", buffering=1 << 20)
        self._handshake()

    def _handshake(self):
        hello = {"op": "data", "version": VERSION, "role": self.role}
        try:
            self.sock.sendall(json.dumps(hello, separators=(",", ":")).encode() + b"\n")
            line = self.reader.readline(MAX_HANDSHAKE_LINE)
        except OSError as e:
            raise PipelineError("the handshake with the agent at %s failed: %s" % (self.path, e)) from e
        if not line.endswith(b"\n"):
            raise ProtocolError("the agent at %s answered the handshake with %d bytes and no newline"
                                % (self.path, len(line)))
        try:
            reply = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ProtocolError("the agent at %s answered the handshake with something not JSON: %r"
                                % (self.path, line[:200])) from e
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
            raise ProtocolError("the agent at %s answered the handshake without a boolean \"ok\": %r"
                                % (self.path, reply))
        if not reply["ok"]:
            raise PipelineError("the agent at %s refused the data connection: %s"
                                % (self.path, reply.get("error", "no reason given")))
        if reply.get("version") != VERSION:
            raise PipelineError("the agent at %s speaks data protocol version %r; this SDK speaks %d"
                                % (self.path, reply.get("version"), VERSION))
        # Requests may be far apart, so reads wait as long as it takes; writes stay
        # bounded. A socket has one timeout, so blocking reads come from select-free
        # blocking mode and sendall's bound from SO_SNDTIMEO.
        self.sock.settimeout(None)
        seconds = int(AGENT_TIMEOUT)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", seconds, 0))

    def _read_exact(self, n):
        data = self.reader.read(n)
        if data is None or len(data) < n:
            raise PipelineError("the agent at %s closed the connection inside a frame" % self.path)
        return data

    def next(self):
        """The next frame as (kind, body), or None once the agent has closed."""
        try:
            head = self.reader.read(4)
            if not head:
                return None
            if len(head) < 4:
                raise PipelineError("the agent at %s closed the connection inside a frame's length prefix"
                                    % self.path)
            (length,) = _U32.unpack(head)
            if length == 0:
                raise self.protocol("frame length 0: a frame holds at least its kind byte")
            if length > MAX_FRAME:
                raise self.protocol("frame length %d is over the limit of %d bytes" % (length, MAX_FRAME))
            data = self._read_exact(length)
        except OSError as e:
            raise PipelineError("the connection to the agent at %s failed: %s" % (self.path, e)) from e
        kind = data[0]
        if kind not in _KIND_NAMES:
            raise self.protocol("unknown frame kind %d; protocol version 1 has kinds 1 to 9" % kind)
        if not _accepts(self.role, kind):
            self.tell("a %s program does not take %s frames" % (self.role, _KIND_NAMES[kind]))
            raise PipelineError("the agent at %s sent a %s frame, which a %s does not take"
                                % (self.path, _KIND_NAMES[kind], self.role))
        return kind, _Body(memoryview(data)[1:], kind)

    def send(self, kind, parts):
        body = b"".join(parts)
        if len(body) + 1 > MAX_FRAME:
            raise self.fail("an answer of %d bytes is over the frame limit of %d bytes"
                            % (len(body) + 1, MAX_FRAME))
        try:
            self.sock.sendall(_FRAME_HEAD.pack(len(body) + 1, kind) + body)
        except OSError as e:
            raise PipelineError("the connection to the agent at %s failed: %s" % (self.path, e)) from e

    def tell(self, message):
        """Tells the agent, with an Error frame, that the program cannot go on."""
        body = _string(message)
        try:
            self.sock.sendall(_FRAME_HEAD.pack(len(body) + 1, ERROR) + body)
        except OSError as e:
            # The program ends with its own error either way; the agent will see the
            # connection close instead of the reason.
            print("drover_pipeline: could not tell the agent why the program stops: %s" % e,
                  file=sys.stderr)

    def fail(self, message):
        self.tell(message)
        return PipelineError("the program failed: " + message)

    def protocol(self, message):
        self.tell("the program could not read the agent's frames: " + message)
        return ProtocolError("the agent at %s broke the data protocol: %s" % (self.path, message))

    def close(self):
        for thing in (self.reader, self.sock):
            try:
                thing.close()
            except OSError as e:
                print("drover_pipeline: closing the connection: %s" % e, file=sys.stderr)


def _accepts(role, kind):
    if role == "map":
        return kind == MAP_REQUEST
    if role == "sink":
        return kind == SINK_REQUEST
    return kind in (READ_REQUEST, ACK_REQUEST)


def _bytes(b):
    return _U32.pack(len(b)) + b


def _string(s):
    return _bytes(s.encode("utf-8"))


def _serve(role, path, handle):
    session = _Session(role, path)
    try:
        while True:
            frame = session.next()
            if frame is None:
                return
            try:
                handle(session, *frame)
            except ProtocolError as e:
                # A frame body the agent got wrong: tell it, as for a bad header.
                raise session.protocol(str(e)) from e
            except PipelineError:
                # Already told (or the connection itself failed).
                raise
            except Exception as e:
                # The user's function raised: the agent learns why the program stops.
                session.tell("the program raised %s: %s" % (type(e).__name__, e))
                raise
    finally:
        session.close()


def map(fn, path=None):
    """Serves a map: ``fn(msg)`` returns a list of ``Output`` for each message (an
    empty list filters it out). Returns when the agent closes the connection."""

    def handle(session, kind, body):
        batch, messages = body.in_messages()
        parts = [_BATCH_COUNT.pack(batch, len(messages))]
        for msg in messages:
            outputs = fn(msg)
            if outputs is None:
                outputs = []
            parts.append(_U32.pack(len(outputs)))
            for out in outputs:
                if not isinstance(out, Output):
                    raise session.fail("the map function returned a %s where an Output belongs"
                                       % type(out).__name__)
                if len(out.tags) > 0xFFFF:
                    raise session.fail("an output carries %d tags; at most 65535 fit" % len(out.tags))
                parts.append(_bytes(out.key))
                parts.append(_U16.pack(len(out.tags)))
                parts.extend(_string(t) for t in out.tags)
                parts.append(_bytes(out.payload))
        session.send(MAP_RESPONSE, parts)

    _serve("map", path, handle)


def sink(fn, path=None):
    """Serves a sink: ``fn(batch)`` writes a list of messages and returns one result per
    message, in order: None or True when written, an error string, an exception or
    False when not. Returns when the agent closes the connection."""

    def handle(session, kind, body):
        batch, messages = body.in_messages()
        results = list(fn(messages))
        if len(results) != len(messages):
            raise session.fail("the sink function answered %d results for a batch of %d messages; "
                               "it must answer one per message" % (len(results), len(messages)))
        parts = [_BATCH_COUNT.pack(batch, len(results))]
        for r in results:
            if r is None or r is True:
                parts.append(b"\x00")
            else:
                parts.append(b"\x01" + _string("failed" if r is False else str(r)))
        session.send(SINK_RESPONSE, parts)

    _serve("sink", path, handle)


def source(obj, path=None):
    """Serves a source: the agent calls ``obj.read(max, wait_seconds)`` for a list of
    ``SourceMessage`` (at most ``max``, waiting at most about ``wait_seconds`` for the
    first), and ``obj.ack(ids)`` with the ids of messages durably written downstream.
    Returns when the agent closes the connection."""
    unacked = {}

    def handle(session, kind, body):
        if kind == READ_REQUEST:
            batch, max_messages, wait_ms = body.unpack(_READ_REQUEST, "read request")
            body.finish()
            if batch in unacked:
                raise ProtocolError("batch %d is already read and not acknowledged" % batch)
            if len(unacked) >= MAX_UNACKED_BATCHES:
                raise session.fail("the agent left %d read batches unacknowledged; a source keeps no more"
                                   % MAX_UNACKED_BATCHES)
            messages = list(obj.read(max_messages, wait_ms / 1000.0))
            if len(messages) > max_messages:
                raise session.fail("the source's read returned %d messages when at most %d were asked for"
                                   % (len(messages), max_messages))
            parts = [_BATCH_COUNT.pack(batch, len(messages))]
            for m in messages:
                parts.append(_bytes(m.id))
                parts.append(_I64.pack(m.event_time))
                parts.append(_bytes(m.key))
                parts.append(_bytes(m.payload))
            unacked[batch] = [m.id for m in messages]
            session.send(READ_RESPONSE, parts)
        else:
            (batch,) = body.unpack(_U64, "batch id")
            body.finish()
            ids = unacked.pop(batch, None)
            if ids is None:
                raise ProtocolError("AckRequest for batch %d, which was never read or is already acknowledged"
                                    % batch)
            if ids:
                obj.ack(ids)
            session.send(ACK_RESPONSE, [_U64.pack(batch)])

    _serve("source", path, handle)
