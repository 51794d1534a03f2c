"""A bounded fuzz of the policy server, on 127.0.0.1 only: random bytes, text and JSON frames, random
and mutated msgpack messages (wrong shapes, dtypes, ids, keys), garbage first messages, oversized frames,
and half-open TCP connections. A fixed seed, a few hundred inputs, a time budget of a few seconds. The
server must answer every frame it reads (an error, never an internal failure), stay up, and still serve
a good client afterwards."""

import json
import random
import socket
import time

import msgpack
import numpy as np
from test_policy_server import small_policy  # the server tests' tiny BC policy
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from labkit.robot.server import PolicyClient, PolicyServer, encode_array

T = 5.0
BUDGET_S = 6.0  # the fuzz loops stop early if they reach this; the counts below are the other bound
N_RANDOM_BYTES, N_TEXT, N_MSGPACK, N_MUTATED, N_BAD_HELLO, N_HUGE, N_HALF_OPEN = 80, 30, 100, 120, 20, 6, 32
ODD_DTYPES = ["float64", "float16", "int8", "uint64", "bool", "object", "O", "V8", "S10", "U3", "complex64",
              "<f4", ">f4", "f4", "f4,f4", "(2,)f4", "datetime64", "", "float32" * 50, "\x00", "i4,"]
ODD_SHAPES = [[], [2], [6, 2], [2, 6, 1], [-1, 6], [2**31, 6], [2**40], [2.0, 6], [True, 6], ["2", 6],
              [[2], 6], None, "2x6", {"a": 1}, [0, 6], [2, 0], [1] * 64]


def rand_obj(rng, depth=0):
    kinds = ["int", "float", "str", "bytes", "none", "bool"] + (["list", "map"] if depth < 3 else [])
    k = rng.choice(kinds)
    if k == "int":
        return rng.choice([0, -1, 1, 2**63 - 1, -(2**63), 2**64 - 1, rng.randint(-1000, 1000)])
    if k == "float":
        return rng.choice([0.0, -0.0, 1e308, float("nan"), float("inf"), rng.random()])
    if k == "str":
        return "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(rng.randint(0, 12)))
    if k == "bytes":
        return rng.randbytes(rng.randint(0, 64))
    if k == "none":
        return None
    if k == "bool":
        return rng.random() < 0.5
    if k == "list":
        return [rand_obj(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["type", "id", "obs", "state", "token", "x"]): rand_obj(rng, depth + 1)
            for _ in range(rng.randint(0, 4))}


def good_predict(i=1):
    return {"type": "predict", "id": i, "obs": {"state": encode_array(np.zeros((2, 6), np.float32))}}


def mutated_predict(rng):
    msg = good_predict(rng.randint(0, 10**6))
    arr = msg["obs"]["state"]
    m = rng.randrange(9)
    if m == 0:
        arr["dtype"] = rng.choice(ODD_DTYPES)
    elif m == 1:
        arr["shape"] = rng.choice(ODD_SHAPES)
    elif m == 2:
        arr["data"] = rng.randbytes(rng.choice([0, 1, 47, 49, 96, 1000]))
    elif m == 3:
        arr["data"] = np.full((2, 6), rng.choice([np.nan, np.inf, -np.inf]), np.float32).tobytes()
    elif m == 4:
        msg["id"] = rng.choice([1.5, "1", [1], {"a": 1}, True, None, 2**64 - 1, -(2**63)])
    elif m == 5:
        msg["obs"] = rng.choice([None, [], "state", {"state": None}, {"state": arr, "other": arr}, {b"state": arr}])
    elif m == 6:
        del arr[rng.choice(["dtype", "shape", "data"])]
    elif m == 7:
        msg[rng.choice(["extra", "token", "obs2"])] = rand_obj(rng)
    else:
        msg["type"] = rng.choice(["ping", "hello", "PREDICT", "", "predict\x00", "chunk"])
    return msg


class Tally:
    def __init__(self):
        self.sent, self.replies, self.closes = 0, {}, {}

    def reply(self, kind):
        self.replies[kind] = self.replies.get(kind, 0) + 1

    def close(self, code):
        self.closes[code] = self.closes.get(code, 0) + 1


def hello_ws(url):
    ws = connect(url, open_timeout=T, close_timeout=0.5, max_size=2**24).__enter__()
    ws.send(msgpack.packb({"type": "hello", "token": None}))
    assert msgpack.unpackb(ws.recv(timeout=T))["type"] == "hello"
    return ws


def send_all(url, frames, tally, deadline):
    """Send frames on one connection, each answered before the next; reconnect when the server closes it."""
    ws = hello_ws(url)
    try:
        for f in frames:
            if time.time() > deadline:
                break
            tally.sent += 1
            try:
                ws.send(f)
                reply = msgpack.unpackb(ws.recv(timeout=T), raw=False)
                assert isinstance(reply, dict) and reply.get("type") in {"error", "chunk", "pong"}, reply
                tally.reply(reply["type"])
            except ConnectionClosed as e:
                tally.close(e.rcvd.code if e.rcvd is not None else None)
                ws = hello_ws(url)
    finally:
        ws.close()


def good_client_served(url):
    with PolicyClient(url, timeout=T) as c:
        return c.predict_chunk([{"state": np.zeros(6, np.float32)}]).shape == (8, 2) and c.ping() < T


def half_open(port, kind, rng):
    """A raw TCP connection left in some broken state; returned open (the caller closes it)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=T)
    req = (f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
    if kind == "nothing":
        pass
    elif kind == "garbage":
        s.sendall(rng.randbytes(rng.randint(1, 512)))
    elif kind == "half_request":
        s.sendall(req[: rng.randint(1, len(req) - 1)])
    elif kind in ("silent", "half_frame", "half_closed"):
        s.sendall(req)
        s.recv(4096)  # the 101 answer
        if kind == "silent":  # a finished handshake, then never a hello
            pass
        elif kind == "half_frame":  # a masked binary frame header announcing 1000 bytes, then only 3 of them
            s.sendall(bytes([0x82, 0xFE, 0x03, 0xE8]) + rng.randbytes(4) + b"abc")
        else:
            s.shutdown(socket.SHUT_WR)
    elif kind == "reset":
        s.sendall(req[:20])
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    return s


def test_fuzz_server_stays_up_and_serves():
    rng = random.Random(20240611)
    # max_clients is small so that the half-open connections held below outnumber it
    srv = PolicyServer(small_policy(), port=0, max_clients=4, hello_timeout=1.0, idle_timeout=5.0, max_pending=16,
                       max_pending_per_host=8).start()
    tally = Tally()
    t0 = time.time()
    deadline = t0 + BUDGET_S
    socks = []
    try:
        # 1. frames after a valid hello: random bytes, text/JSON, random msgpack, mutated predicts
        frames = [rng.randbytes(rng.randint(0, 300)) for _ in range(N_RANDOM_BYTES)]
        frames += [rng.choice([json.dumps(good_predict()["obs"]["state"]["shape"]), json.dumps({"type": "predict"}),
                               "{not json", "", "\x00" * 10, json.dumps([1, {"type": "ping", "id": 1}])])
                   for _ in range(N_TEXT)]
        frames += [msgpack.packb(rand_obj(rng), use_bin_type=True) for _ in range(N_MSGPACK)]
        frames += [msgpack.packb(mutated_predict(rng), use_bin_type=True) for _ in range(N_MUTATED)]
        rng.shuffle(frames)
        send_all(srv.url, frames, tally, deadline)
        assert good_client_served(srv.url)

        # 2. garbage instead of a hello: an error, then the connection is closed (1008)
        for _ in range(N_BAD_HELLO):
            ws = connect(srv.url, open_timeout=T, close_timeout=0.5).__enter__()
            bad = rng.choice([rng.randbytes(rng.randint(0, 100)), msgpack.packb(rand_obj(rng)),
                              msgpack.packb(good_predict()), msgpack.packb({"type": "hello", "token": 5, "x": 1})])
            tally.sent += 1
            try:
                ws.send(bad)
                tally.reply(msgpack.unpackb(ws.recv(timeout=T))["type"])
                ws.recv(timeout=T)
            except ConnectionClosed as e:
                tally.close(e.rcvd.code if e.rcvd is not None else None)
            finally:
                ws.close()

        # 3. frames over max_message_bytes close only that connection (1009)
        for _ in range(N_HUGE):
            ws = hello_ws(srv.url)
            tally.sent += 1
            try:
                ws.send(rng.randbytes(srv.max_message_bytes + 1 + rng.randint(0, 4 * srv.max_message_bytes)))
                ws.recv(timeout=T)
            except ConnectionClosed as e:
                tally.close(e.rcvd.code if e.rcvd is not None else None)
            finally:
                ws.close()

        # 4. half-open TCP connections, held open while a good client is served
        kinds = ["nothing", "garbage", "half_request", "silent", "half_frame", "half_closed", "reset", "silent"]
        for i in range(N_HALF_OPEN):
            kind = kinds[i % len(kinds)]
            s = half_open(srv.port, kind, rng)
            if kind == "reset":
                s.close()  # with SO_LINGER 0: a TCP reset
            else:
                socks.append(s)
        assert good_client_served(srv.url)
        elapsed = time.time() - t0
    finally:
        for s in socks:
            s.close()

    try:
        assert good_client_served(srv.url)  # and once they are gone
        assert srv._thread is not None and srv._thread.is_alive()
        assert 1011 not in tally.closes, tally.closes  # never an internal error
        assert set(tally.closes) <= {1008, 1009}, tally.closes
        assert tally.closes.get(1009, 0) == N_HUGE
        assert tally.sent >= 100 and elapsed < BUDGET_S + 10
        print(f"\nfuzz: {tally.sent} inputs + {N_HALF_OPEN} half-open sockets in {elapsed:.2f} s; "
              f"replies {tally.replies}; closes {tally.closes}; server stats {srv.stats}")
    finally:
        srv.stop()
