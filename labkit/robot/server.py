"""Serve any labkit policy over WebSockets (msgpack frames), so a laptop or GPU box drives the robot.

Protocol, one binary msgpack map per frame:
  client -> {"type": "hello", "token": str | None}        server -> {"type": "hello", "spec": {...}}
  client -> {"type": "predict", "id": n, "obs": {key: array}}  server -> {"type": "chunk", "id": n,
            "action": array, "server_ms": float}
  client -> {"type": "ping", "id": n}                     server -> {"type": "pong", "id": n}
  any malformed message                                   server -> {"type": "error", "id": n|None,
                                                                     "error": "what is wrong"}
An array is {"dtype": str, "shape": [..], "data": bytes}; observations are [obs_horizon, *shape].

Security: binds 127.0.0.1 by default and refuses another address without a token; the token is
compared in constant time; a frame larger than `max_message_bytes` closes that connection (code 1009)
before it is read into memory; every message is validated (keys, dtypes, shapes, NaN/inf) and a bad
one gets an error answer, never a crash. A client that disconnects, even mid-request, leaves the
server serving the others. Inference runs in one worker thread, so the event loop stays responsive.

Who holds a slot: only a client that has said a valid hello (with the token, when there is one) takes
one of the `max_clients` slots. Connections that have not said hello yet wait in a separate, small
pool (`max_pending` in all, `max_pending_per_host` per address); when a pool is full the oldest waiting
connection is closed to make room, so silent connections can never keep the token holder out, and each
is closed after `hello_timeout` anyway. A client that has said hello but finds every slot taken waits
up to `queue_timeout` for one, then gets an error and close code 1013. A client that sends nothing for
`idle_timeout` seconds is closed (code 4408, "idle timeout"); `PolicyClient` reconnects by itself when
that happens.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import threading
import time
from typing import Any

import msgpack
import numpy as np

from labkit.robot.control import PolicyRunner, as_chunk_source

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
PROTOCOL_VERSION = 1
IDLE_CLOSE_CODE = 4408  # application close code: the client sent nothing for `idle_timeout` seconds
MAX_ERROR_CHARS = 500  # error texts echo client input; keep the answers small


class ProtocolError(ValueError):
    """A message that breaks the protocol; its text is sent back to the client."""


class PolicyServerError(RuntimeError):
    """The server answered a request with an error."""


# ---- arrays on the wire --------------------------------------------------------------------------------
def encode_array(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a)
    return {"dtype": a.dtype.name, "shape": list(a.shape), "data": a.tobytes()}


def decode_array(d: Any, name: str, shape: list[int] | None = None, dtype: str | None = None) -> np.ndarray:
    """A wire array back to numpy, checked against the expected shape and dtype; ProtocolError if not."""
    if not isinstance(d, dict) or set(d) != {"dtype", "shape", "data"}:
        raise ProtocolError(f"{name}: an array must be a map with exactly dtype, shape, data")
    if not isinstance(d["dtype"], str) or not isinstance(d["data"], bytes) or not isinstance(d["shape"], list):
        raise ProtocolError(f"{name}: dtype must be a string, shape a list, data bytes")
    if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**31 for s in d["shape"]):
        raise ProtocolError(f"{name}: shape must hold non-negative integers, got {d['shape']}")
    if dtype is not None and d["dtype"] != dtype:
        raise ProtocolError(f"{name}: dtype must be {dtype}, got {d['dtype']}")
    if shape is not None and list(d["shape"]) != list(shape):
        raise ProtocolError(f"{name}: shape must be {list(shape)}, got {d['shape']}")
    try:
        dt = np.dtype(d["dtype"])
    except Exception as e:  # noqa: BLE001  (numpy raises TypeError, ValueError, ... for odd strings)
        raise ProtocolError(f"{name}: unknown dtype {d['dtype']!r}") from e
    if dt.kind not in "fiub" or dt.itemsize > 8:
        raise ProtocolError(f"{name}: dtype {d['dtype']} is not a plain numeric type")
    n = int(np.prod(d["shape"], dtype=np.int64)) * dt.itemsize
    if n != len(d["data"]):
        raise ProtocolError(f"{name}: {len(d['data'])} data bytes do not match shape {d['shape']} of {d['dtype']}")
    a = np.frombuffer(d["data"], dtype=dt).reshape(d["shape"]).copy()  # writable, owned
    if dt.kind == "f" and not np.all(np.isfinite(a)):
        raise ProtocolError(f"{name}: contains NaN or inf")
    return a


def pack(msg: dict) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def unpack(raw: Any) -> dict:
    if not isinstance(raw, bytes | bytearray):
        raise ProtocolError("frames must be binary msgpack, not text")
    try:
        msg = msgpack.unpackb(raw, raw=False, strict_map_key=True)  # limits default to the frame size
    except Exception as e:  # noqa: BLE001  (any decoding failure is the client's problem, not ours)
        raise ProtocolError(f"not valid msgpack: {type(e).__name__}") from e
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("a message must be a map with a string 'type'")
    return msg


def _short(text: str, n: int = MAX_ERROR_CHARS) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _check_keys(msg: dict, allowed: set[str]) -> None:
    extra = set(msg) - allowed
    if extra:
        raise ProtocolError(f"unknown keys {sorted(map(str, extra))} in a {msg['type']!r} message; allowed: {sorted(allowed)}")


# ---- server ---------------------------------------------------------------------------------------------
class PolicyServer:
    """`PolicyServer(policy).start()` serves in a background thread; `serve_forever()` blocks.

    `policy`: a labkit policy (or any chunk source with `spec()` and `predict_chunk(obs dict)`).
    `port=0` picks a free port (read `server.port` after `start()`).
    `max_clients`: clients served at once (only clients past a valid hello count);
    `hello_timeout`: seconds a new connection has to say hello;
    `max_pending`, `max_pending_per_host`: connections waiting for their hello, in all and per address
    (the oldest is closed to make room for a new one);
    `queue_timeout`: seconds a client past its hello waits for a free slot before it is refused;
    `idle_timeout`: seconds a client may send nothing before it is closed (None: never).
    """

    def __init__(self, policy: Any, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
                 max_message_bytes: int | None = None, hello_timeout: float = 5.0, max_clients: int = 32,
                 max_pending: int = 64, max_pending_per_host: int = 8, queue_timeout: float = 2.0,
                 idle_timeout: float | None = 60.0):
        if host not in LOCAL_HOSTS and not token:
            raise ValueError(f"refusing to serve on {host!r} without a token: anyone who reaches that address "
                             "could drive the robot. Pass token=... (command line: set $LABKIT_POLICY_TOKEN) and give it to the client, or bind 127.0.0.1")
        self.runner = as_chunk_source(policy)
        if self.runner is None or not hasattr(self.runner, "spec"):
            raise TypeError(f"cannot serve {type(policy).__name__}: need a labkit policy or a PolicyRunner")
        self.spec = self.runner.spec()
        self.host, self.port, self.token = host, int(port), token
        T = self.spec["obs_horizon"]
        expected = sum(int(np.prod([T, *s])) * np.dtype(self.spec["dtypes"][k]).itemsize
                       for k, s in self.spec["shapes"].items())
        self.max_message_bytes = int(max_message_bytes or max(64 * 1024, 2 * expected + 4096))
        self.hello_timeout, self.max_clients = float(hello_timeout), int(max_clients)
        self.max_pending, self.max_pending_per_host = max(1, int(max_pending)), max(1, int(max_pending_per_host))
        self.queue_timeout = float(queue_timeout)
        self.idle_timeout = None if idle_timeout is None else float(idle_timeout)
        self.stats = {"clients": 0, "requests": 0, "errors": 0, "disconnects": 0,
                      "evicted": 0, "idle_closed": 0, "refused": 0}
        self._clients = 0  # connections past their hello that hold a slot
        self._pending: dict[Any, str] = {}  # connections still waiting for their hello -> peer address (oldest first)
        self._closing: set[asyncio.Task] = set()
        self._slot_freed: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._infer_lock: asyncio.Lock | None = None
        self._error: BaseException | None = None

    # ---- running --------------------------------------------------------------------------------------
    async def serve(self) -> None:
        """Serve until `stop()`."""
        from websockets.asyncio.server import serve

        self._stopped = asyncio.Event()
        self._infer_lock = asyncio.Lock()
        self._slot_freed = asyncio.Condition()
        async with serve(self._handle, self.host, self.port, max_size=self.max_message_bytes,
                         ping_interval=20, ping_timeout=20, close_timeout=2) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._loop = asyncio.get_running_loop()
            self._ready.set()
            await self._stopped.wait()

    def serve_forever(self) -> None:
        asyncio.run(self.serve())

    def start(self, timeout: float = 10.0) -> PolicyServer:
        """Serve in a daemon thread; returns once the socket is listening."""

        def run():
            try:
                asyncio.run(self.serve())
            except BaseException as e:  # noqa: BLE001  (reported to start())
                self._error = e
                self._ready.set()

        self._thread = threading.Thread(target=run, name="labkit-policy-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the policy server did not start within {timeout} s")
        if self._error is not None:
            raise RuntimeError(f"the policy server failed to start on {self.host}:{self.port}: {self._error}")
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def __enter__(self) -> PolicyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- one connection -------------------------------------------------------------------------------
    async def _handle(self, ws) -> None:
        from websockets.exceptions import ConnectionClosed

        self.stats["clients"] += 1
        self._admit_pending(ws)
        slot = False
        try:
            if not await self._hello(ws):
                return
            slot = await self._take_slot()
            if not slot:
                self.stats["refused"] += 1
                await ws.send(pack({"type": "error", "id": None, "error": f"too many clients ({self.max_clients} served)"}))
                await ws.close(1013, "too many clients")
                return
            await ws.send(pack({"type": "hello", "version": PROTOCOL_VERSION, "spec": self.spec}))
            while True:
                try:
                    raw = await asyncio.wait_for(ws.recv(), self.idle_timeout)
                except TimeoutError:
                    self.stats["idle_closed"] += 1
                    await ws.close(IDLE_CLOSE_CODE, "idle timeout")
                    return
                await ws.send(pack(await self._answer(raw)))
        except ConnectionClosed:
            self.stats["disconnects"] += 1
        except Exception:  # noqa: BLE001  (one connection's failure must never stop the server)
            self.stats["errors"] += 1
            await ws.close(1011, "internal error")
        finally:
            self._pending.pop(ws, None)
            if slot:
                await self._free_slot()

    def _admit_pending(self, ws) -> None:
        """Put a new connection in the pool of those waiting for their hello, closing the oldest waiting
        one (from the same address first) when a budget is spent, so a flood cannot keep others out."""
        addr = ws.remote_address
        host = str(addr[0]) if isinstance(addr, tuple | list) and addr else "?"
        same = [w for w, h in self._pending.items() if h == host]
        if len(same) >= self.max_pending_per_host:
            self._evict(same[0])
        elif len(self._pending) >= self.max_pending:
            self._evict(next(iter(self._pending)))
        self._pending[ws] = host

    def _evict(self, ws) -> None:
        self._pending.pop(ws, None)
        self.stats["evicted"] += 1
        task = asyncio.ensure_future(ws.close(1008, "no hello: too many connections waiting"))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _take_slot(self) -> bool:
        """Wait up to `queue_timeout` for one of the `max_clients` slots; False if none came free."""
        assert self._slot_freed is not None
        try:
            async with self._slot_freed:
                await asyncio.wait_for(self._slot_freed.wait_for(lambda: self._clients < self.max_clients),
                                       self.queue_timeout)
                self._clients += 1
                return True
        except TimeoutError:
            return False

    async def _free_slot(self) -> None:
        assert self._slot_freed is not None
        async with self._slot_freed:
            self._clients -= 1
            self._slot_freed.notify()

    async def _hello(self, ws) -> bool:
        """Read and check the hello (and its token); True if the client may go on. Does not answer it:
        the answer (the spec) comes once the client holds a slot."""
        try:
            raw = await asyncio.wait_for(ws.recv(), self.hello_timeout)
            self._pending.pop(ws, None)  # it spoke: no longer a silent connection
            msg = unpack(raw)
            if msg["type"] != "hello":
                raise ProtocolError(f"the first message must be a hello, got {msg['type']!r}")
            _check_keys(msg, {"type", "token", "version"})
        except TimeoutError:
            await ws.close(1008, "no hello")
            return False
        except ProtocolError as e:
            self.stats["errors"] += 1
            await ws.send(pack({"type": "error", "id": None, "error": _short(str(e))}))
            await ws.close(1008, "bad hello")
            return False
        given = msg.get("token")
        if self.token and not (isinstance(given, str) and hmac.compare_digest(given.encode(), self.token.encode())):
            self.stats["errors"] += 1
            await ws.send(pack({"type": "error", "id": None, "error": "wrong or missing token"}))
            await ws.close(1008, "wrong token")
            return False
        return True

    async def _answer(self, raw: Any) -> dict:
        """The reply to one message: a chunk, a pong, or an error naming the problem."""
        rid = None
        try:
            msg = unpack(raw)
            rid = msg.get("id")
            if not (rid is None or (isinstance(rid, int) and not isinstance(rid, bool))):
                rid = None
                raise ProtocolError("id must be an integer")
            if msg["type"] == "ping":
                _check_keys(msg, {"type", "id"})
                return {"type": "pong", "id": rid}
            if msg["type"] != "predict":
                raise ProtocolError(f"unknown message type {msg['type']!r}; expected predict or ping")
            _check_keys(msg, {"type", "id", "obs"})
            obs = self._validate_obs(msg.get("obs"))
        except ProtocolError as e:
            self.stats["errors"] += 1
            return {"type": "error", "id": rid, "error": _short(str(e))}
        t0 = time.perf_counter()
        try:
            async with self._infer_lock:  # one inference at a time, off the event loop
                chunk = await asyncio.to_thread(self.runner.predict_chunk, obs)
        except Exception as e:  # noqa: BLE001
            self.stats["errors"] += 1
            return {"type": "error", "id": rid, "error": _short(f"the policy failed: {type(e).__name__}: {e}")}
        self.stats["requests"] += 1
        return {"type": "chunk", "id": rid, "action": encode_array(np.asarray(chunk, np.float32)),
                "server_ms": (time.perf_counter() - t0) * 1e3}

    def _validate_obs(self, obs: Any) -> dict[str, np.ndarray]:
        keys = self.spec["obs_keys"]
        if not isinstance(obs, dict) or set(obs) != set(keys):
            got = sorted(map(str, obs)) if isinstance(obs, dict) else type(obs).__name__
            raise ProtocolError(f"obs must be a map with exactly the keys {keys}; got {got}")
        T = self.spec["obs_horizon"]
        return {k: decode_array(obs[k], f"obs[{k!r}]", [T, *self.spec["shapes"][k]], self.spec["dtypes"][k])
                for k in keys}


# ---- client --------------------------------------------------------------------------------------------
class PolicyClient:
    """The robot side: a chunk source (`predict_chunk(history) -> [H, A]`) backed by a PolicyServer.

    Synchronous (the robot process is a plain loop); every call has a timeout. Round-trip times of
    every request are kept in `latencies` (seconds); `latency_stats()` gives p50/p99.
    """

    def __init__(self, url: str = "ws://127.0.0.1:8765", token: str | None = None, timeout: float = 5.0,
                 max_message_bytes: int = 64 * 2**20):
        self.url, self.token, self.timeout = url, token, float(timeout)
        self.max_message_bytes = max_message_bytes
        self.latencies: list[float] = []
        self.server_ms: list[float] = []
        self._ws = None
        self._id = 0
        self.spec: dict[str, Any] = {}

    def _spec(self, key: str) -> int:
        if not self.spec:
            raise PolicyServerError("the client is not connected: call connect() (or use `with PolicyClient(...)`)")
        return int(self.spec[key])

    obs_horizon = property(lambda self: self._spec("obs_horizon"))
    horizon = property(lambda self: self._spec("horizon"))
    n_action_steps = property(lambda self: self._spec("n_action_steps"))

    def connect(self) -> PolicyClient:
        from websockets.sync.client import connect

        ws = connect(self.url, open_timeout=self.timeout, close_timeout=2, max_size=self.max_message_bytes)
        self._ws = ws.__enter__()  # held open across calls; __enter__ is what websockets >= 17.1 asks for
        self._ws.send(pack({"type": "hello", "token": self.token, "version": PROTOCOL_VERSION}))
        reply = unpack(self._ws.recv(timeout=self.timeout))
        if reply["type"] != "hello":
            self.close()
            raise PolicyServerError(f"the server refused the connection: {reply.get('error', reply)}")
        self.spec = reply["spec"]
        return self

    def _call(self, msg: dict) -> dict:
        from websockets.exceptions import ConnectionClosed

        if self._ws is None:
            raise PolicyServerError("not connected: call connect() first")
        self._id += 1
        msg["id"] = self._id
        try:
            t0 = time.perf_counter()
            self._ws.send(pack(msg))
            reply = unpack(self._ws.recv(timeout=self.timeout))
        except ConnectionClosed as e:  # the server closed an idle connection: reconnect once and resend
            if e.rcvd is None or e.rcvd.code != IDLE_CLOSE_CODE:
                raise
            self.close()
            self.connect()
            t0 = time.perf_counter()
            self._ws.send(pack(msg))
            reply = unpack(self._ws.recv(timeout=self.timeout))
        dt = time.perf_counter() - t0
        if reply.get("type") == "error":
            raise PolicyServerError(reply.get("error"))
        if reply.get("id") != self._id:
            raise PolicyServerError(f"reply id {reply.get('id')} does not match request {self._id}")
        self.latencies.append(dt)
        return reply

    def stack(self, history: list[dict] | dict) -> dict[str, np.ndarray]:
        """Observation history -> {key: [obs_horizon, ...]} in the dtypes the server expects."""
        if isinstance(history, dict):
            return {k: np.asarray(history[k], dtype=self.spec["dtypes"][k]) for k in self.spec["obs_keys"]}
        hist = list(history)[-self.obs_horizon:]
        hist = [hist[0]] * (self.obs_horizon - len(hist)) + hist
        return {k: np.stack([np.asarray(h[k], dtype=self.spec["dtypes"][k]) for h in hist])
                for k in self.spec["obs_keys"]}

    def predict_chunk(self, history: list[dict] | dict) -> np.ndarray:
        obs = {k: encode_array(v) for k, v in self.stack(history).items()}
        reply = self._call({"type": "predict", "obs": obs})
        self.server_ms.append(float(reply.get("server_ms", float("nan"))))
        return decode_array(reply["action"], "action").astype(np.float32)

    def ping(self) -> float:
        """One round trip with no inference; returns seconds."""
        self._call({"type": "ping"})
        return self.latencies[-1]

    def latency_stats(self) -> dict[str, float]:
        ms = np.asarray(self.latencies) * 1e3
        if not len(ms):
            return {"n": 0}
        return {"n": len(ms), "mean_ms": float(ms.mean()), "p50_ms": float(np.percentile(ms, 50)),
                "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max())}

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None

    def __enter__(self) -> PolicyClient:
        return self.connect() if self._ws is None else self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> None:
    """`python -m labkit.robot.server CHECKPOINT [--host H] [--port P]`; token from $LABKIT_POLICY_TOKEN."""
    import argparse

    from labkit.policies import load_policy

    p = argparse.ArgumentParser(description="serve a labkit policy checkpoint over WebSockets")
    p.add_argument("checkpoint")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    policy = load_policy(args.checkpoint, map_location=args.device)
    server = PolicyServer(PolicyRunner(policy), args.host, args.port, token=os.environ.get("LABKIT_POLICY_TOKEN"))
    print(f"serving {args.checkpoint} on ws://{args.host}:{args.port} (Ctrl-C stops)")
    server.serve_forever()


if __name__ == "__main__":
    main()
