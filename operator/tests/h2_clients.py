#!/usr/bin/env python3
"""Independent HTTP/2 clients against the operator's config stream (plaintext port): python's
`h2` for normal use, and raw frames (`hyperframe`, `hpack`) for the attacks the server must
answer with GOAWAY. Run by operator/tests/h2_clients.rs.

usage: h2_clients.py HOST PORT IDENTITY
Prints one line per case and a closing `N passed, N failed`; exits 1 when any case failed.
"""
import json
import socket
import sys
import time

import h2.config
import h2.connection
import h2.events
import hpack
from hyperframe.frame import (ContinuationFrame, DataFrame, Frame, GoAwayFrame, HeadersFrame,
                              PingFrame, SettingsFrame)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ERRORS = {0x1: "PROTOCOL_ERROR", 0x5: "STREAM_CLOSED", 0xB: "ENHANCE_YOUR_CALM"}


def connect(host, port):
    s = socket.create_connection((host, port), timeout=10)
    return s


def request_block(encoder, method, path, extra=()):
    return encoder.encode([(":method", method), (":scheme", "http"), (":path", path),
                           (":authority", "operator")] + list(extra))


def read_frames(sock, until, limit_s=10.0):
    """Frames from `sock` until `until(frame)` is true or the connection ends; returns them
    (and, as the attribute `ended` of the list, whether the connection ended)."""
    buf, frames = b"", Frames()
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        while len(buf) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(buf[:9]))
            if len(buf) < 9 + length:
                break
            frame.parse_body(memoryview(buf[9:9 + length]))
            buf = buf[9 + length:]
            frames.append(frame)
            if until(frame):
                return frames
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        except socket.timeout:
            return frames
        if not chunk:
            frames.ended = True
            return frames
        buf += chunk
    return frames


class Frames(list):
    ended = False


def goaway_code(sock):
    """The GOAWAY's error code; `closed` when the connection ended without one reaching us
    (a peer that does not read may not get it), None when it is still open."""
    frames = read_frames(sock, lambda f: isinstance(f, GoAwayFrame))
    last = [f for f in frames if isinstance(f, GoAwayFrame)]
    if last:
        return ERRORS.get(last[-1].error_code, hex(last[-1].error_code))
    return "closed" if frames.ended else None


def open_raw(host, port):
    sock = connect(host, port)
    sock.sendall(PREFACE + SettingsFrame(0).serialize())
    return sock


def normal_use(host, port, identity):
    """python-h2 as a proxy would: POST the config stream, get the first config, acknowledge it."""
    sock = connect(host, port)
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, [(":method", "POST"), (":scheme", "http"), (":authority", "operator"),
                               (":path", "/v1/config-stream"), ("x-skein-identity", identity),
                               ("x-skein-proxy-id", "python-h2")])
    sock.sendall(conn.data_to_send())
    body, deadline = b"", time.monotonic() + 10
    while b"\n" not in body and time.monotonic() < deadline:
        for event in conn.receive_data(sock.recv(65536)):
            if isinstance(event, h2.events.DataReceived):
                body += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, stream)
        sock.sendall(conn.data_to_send())
    line = body.split(b"\n")[0]
    assert b'"version"' in line, f"no first config: {body[:200]!r}"
    version = json.loads(line)["version"]
    conn.send_data(stream, json.dumps({"version": version}).encode() + b"\n")
    conn.close_connection()
    sock.sendall(conn.data_to_send())
    sock.close()
    return f"first config {version} received and acknowledged"


def not_found(host, port, _identity):
    sock = connect(host, port)
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", "operator"),
                          (":path", "/elsewhere")], end_stream=True)
    sock.sendall(conn.data_to_send())
    status, ended, deadline = None, False, time.monotonic() + 10
    while not ended and time.monotonic() < deadline:
        for event in conn.receive_data(sock.recv(65536)):
            if isinstance(event, h2.events.ResponseReceived):
                status = dict(event.headers)[b":status"]
            if isinstance(event, h2.events.StreamEnded):
                ended = True
        sock.sendall(conn.data_to_send())
    assert status == b"404" and ended, f"status {status!r}, ended {ended}"
    sock.close()
    return "GET /elsewhere: 404"


def continuation_flood(host, port, _identity):
    sock = open_raw(host, port)
    head = HeadersFrame(1)
    head.data = b""
    out = [head.serialize()]
    empty = ContinuationFrame(1)
    empty.data = b""
    out += [empty.serialize()] * 20000
    sock.sendall(b"".join(out))
    code = goaway_code(sock)
    assert code == "ENHANCE_YOUR_CALM", code
    return "20,000 empty CONTINUATIONs: GOAWAY ENHANCE_YOUR_CALM"


def ping_flood_not_read(host, port, _identity):
    sock = open_raw(host, port)
    ping = PingFrame(0)
    ping.opaque_data = b"12345678"
    try:
        sock.sendall(ping.serialize() * 20000)
    except (BrokenPipeError, ConnectionResetError):
        return "20,000 unread PINGs: connection ended while sending"
    code = goaway_code(sock)
    assert code in ("ENHANCE_YOUR_CALM", "closed"), code
    return f"20,000 unread PINGs: connection ended ({code})"


def stream_id_backwards(host, port, _identity):
    sock = open_raw(host, port)
    enc = hpack.Encoder()
    five = HeadersFrame(5, flags=["END_HEADERS", "END_STREAM"])
    five.data = request_block(enc, "GET", "/a")
    three = HeadersFrame(3, flags=["END_HEADERS", "END_STREAM"])
    three.data = request_block(enc, "GET", "/b")
    sock.sendall(five.serialize() + three.serialize())
    code = goaway_code(sock)
    assert code == "PROTOCOL_ERROR", code
    return "stream 3 after stream 5: GOAWAY PROTOCOL_ERROR"


def data_after_both_ended(host, port, _identity):
    sock = open_raw(host, port)
    enc = hpack.Encoder()
    one = HeadersFrame(1, flags=["END_HEADERS", "END_STREAM"])
    one.data = request_block(enc, "GET", "/done")
    sock.sendall(one.serialize())
    read_frames(sock, lambda f: isinstance(f, DataFrame) and "END_STREAM" in f.flags)
    late = DataFrame(1, flags=["END_STREAM"])
    late.data = b"late"
    sock.sendall(late.serialize())
    code = goaway_code(sock)
    assert code == "STREAM_CLOSED", code
    return "DATA on a stream both sides ended: GOAWAY STREAM_CLOSED"


def content_length_short(host, port, _identity):
    sock = open_raw(host, port)
    enc = hpack.Encoder()
    head = HeadersFrame(1, flags=["END_HEADERS"])
    head.data = request_block(enc, "POST", "/elsewhere", [("content-length", "10")])
    data = DataFrame(1, flags=["END_STREAM"])
    data.data = b"abc"
    sock.sendall(head.serialize() + data.serialize())
    frames = read_frames(sock, lambda f: f.type == 0x3)
    resets = [f for f in frames if f.type == 0x3]
    assert resets and resets[-1].error_code == 0x1, [repr(f) for f in frames]
    return "content-length 10 with 3 bytes: RST_STREAM PROTOCOL_ERROR"


CASES = [normal_use, not_found, continuation_flood, ping_flood_not_read, stream_id_backwards,
         data_after_both_ended, content_length_short]


def main():
    host, port, identity = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    passed = failed = 0
    for case in CASES:
        try:
            print(f"ok   {case.__name__}: {case(host, port, identity)}", flush=True)
            passed += 1
        except Exception as e:  # noqa: BLE001 - every failure is reported by case
            print(f"FAIL {case.__name__}: {type(e).__name__}: {e}", flush=True)
            failed += 1
    print(f"python-h2: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
