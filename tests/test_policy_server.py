"""PolicyServer/PolicyClient: round trips, malformed/oversized/wrong-token messages, a client dropping
mid-request, and the server binding rules. Every network call has a timeout."""

import threading
import time

import msgpack
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

import labkit  # noqa: F401
from labkit.policies.bc import BCPolicy
from labkit.robot import ControlLoop, FakeClock, PolicyRunner, SimRobot
from labkit.robot.server import PolicyClient, PolicyServer, PolicyServerError, encode_array

T = 5.0  # seconds: the longest any call here may wait


def small_policy():
    z = lambda n, v: [v] * n  # noqa: E731
    stats = {"observation.state": {"mean": z(6, 0.0), "std": z(6, 1.0), "min": z(6, -1.0), "max": z(6, 1.0)},
             "action": {"min": z(2, -0.5), "max": z(2, 0.5), "mean": z(2, 0.0), "std": z(2, 1.0)}}
    return BCPolicy({"obs_horizon": 2, "horizon": 8, "n_action_steps": 4, "hidden": 32, "layers": 2},
                    {"observation.state": [6], "action": [2]}, stats)


class SlowRunner(PolicyRunner):
    def predict_chunk(self, history):
        time.sleep(0.3)
        return super().predict_chunk(history)


@pytest.fixture(scope="module")
def server():
    srv = PolicyServer(small_policy(), port=0).start()
    yield srv
    srv.stop()


def raw_client(url):
    ws = connect(url, open_timeout=T, close_timeout=1).__enter__()
    ws.send(msgpack.packb({"type": "hello", "token": None}))
    assert msgpack.unpackb(ws.recv(timeout=T))["type"] == "hello"
    return ws


def ask(ws, msg):
    ws.send(msg if isinstance(msg, bytes | str) else msgpack.packb(msg, use_bin_type=True))
    return msgpack.unpackb(ws.recv(timeout=T), raw=False)


def good_obs(dtype=np.float32, shape=(2, 6)):
    return {"state": encode_array(np.zeros(shape, dtype))}


def test_round_trip_matches_local_inference(server):
    runner = PolicyRunner(server.runner.policy)
    obs = [{"state": np.full(6, 0.1 * i, np.float32)} for i in range(3)]
    with PolicyClient(server.url, timeout=T) as client:
        assert client.spec["obs_keys"] == ["state"] and client.obs_horizon == 2
        chunk = client.predict_chunk(obs)
        assert chunk.shape == (8, 2) and np.allclose(chunk, runner.predict_chunk(obs), atol=1e-6)
        for _ in range(20):
            client.predict_chunk(obs)
        client.ping()
        st = client.latency_stats()
        assert st["n"] == 22 and 0 < st["p50_ms"] <= st["p99_ms"] < 1000


@pytest.mark.parametrize("bad, expect", [
    (b"\xc1\xff not msgpack", "msgpack"),
    ("a text frame", "binary"),
    ([1, 2, 3], "map"),
    ({"type": "train"}, "unknown message type"),
    ({"type": "predict", "id": 1, "obs": good_obs(), "extra": 1}, "unknown keys"),
    ({"type": "predict", "id": 1}, "exactly the keys"),
    ({"type": "predict", "id": 1, "obs": {**good_obs(), "pixels": good_obs()["state"]}}, "exactly the keys"),
    ({"type": "predict", "id": 1, "obs": good_obs(np.float64)}, "dtype"),
    ({"type": "predict", "id": 1, "obs": good_obs(shape=(2, 7))}, "shape"),
    ({"type": "predict", "id": 1, "obs": good_obs(shape=(1, 6))}, "shape"),
    ({"type": "predict", "id": 1, "obs": {"state": {**good_obs()["state"], "data": b"\0" * 7}}}, "data bytes"),
    ({"type": "predict", "id": 1, "obs": {"state": encode_array(np.full((2, 6), np.nan, np.float32))}}, "NaN"),
    ({"type": "predict", "id": 1, "obs": {"state": {"dtype": "float32", "shape": "2x6", "data": b""}}}, "shape"),
    ({"type": "predict", "id": True, "obs": good_obs()}, "id"),
    ({"type": "predict", "id": 1, "obs": {"state": [[0.0] * 6] * 2}}, "array"),
])
def test_malformed_messages_get_an_error_and_the_connection_survives(server, bad, expect):
    ws = raw_client(server.url)
    try:
        reply = ask(ws, bad)
        assert reply["type"] == "error" and expect.lower() in reply["error"].lower(), reply
        ok = ask(ws, {"type": "predict", "id": 7, "obs": good_obs()})
        assert ok["type"] == "chunk" and ok["id"] == 7 and ok["action"]["shape"] == [8, 2]
    finally:
        ws.close()


def test_oversized_message_closes_only_that_connection(server):
    ws = raw_client(server.url)
    with pytest.raises(ConnectionClosed) as info:
        ws.send(msgpack.packb({"type": "predict", "id": 1, "obs": {"state": b"x" * (server.max_message_bytes + 10)}}))
        ws.recv(timeout=T)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009  # "message too big"
    with PolicyClient(server.url, timeout=T) as client:  # the server still serves others
        assert client.predict_chunk([{"state": np.zeros(6, np.float32)}]).shape == (8, 2)


def test_token_is_required_and_checked():
    srv = PolicyServer(small_policy(), port=0, token="s3cret-token").start()
    try:
        with pytest.raises(PolicyServerError, match="token"):
            PolicyClient(srv.url, token="wrong", timeout=T).connect()
        with pytest.raises(PolicyServerError, match="token"):
            PolicyClient(srv.url, timeout=T).connect()
        ws = connect(srv.url, open_timeout=T).__enter__()
        reply = ask(ws, {"type": "predict", "id": 1, "obs": good_obs()})  # skipping the hello
        assert reply["type"] == "error" and "hello" in reply["error"]
        with PolicyClient(srv.url, token="s3cret-token", timeout=T) as client:
            assert client.predict_chunk([{"state": np.zeros(6, np.float32)}]).shape == (8, 2)
        assert srv.stats["errors"] >= 3
    finally:
        srv.stop()


def test_binding_rules():
    with pytest.raises(ValueError, match="token"):
        PolicyServer(small_policy(), host="0.0.0.0")
    srv = PolicyServer(small_policy(), host="0.0.0.0", port=0, token="t")
    assert srv.host == "0.0.0.0"  # allowed with a token (not started)
    assert PolicyServer(small_policy()).host == "127.0.0.1"


def test_client_dropping_mid_request_leaves_the_server_serving():
    srv = PolicyServer(SlowRunner(small_policy()), port=0).start()
    try:
        ws = raw_client(srv.url)
        ws.send(msgpack.packb({"type": "predict", "id": 1, "obs": good_obs()}))
        ws.close()  # gone before the answer
        results = []

        def other():
            with PolicyClient(srv.url, timeout=T) as c:
                results.append(c.predict_chunk([{"state": np.zeros(6, np.float32)}]).shape)

        threads = [threading.Thread(target=other) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(3 * T)
        assert results == [(8, 2), (8, 2)]
        deadline = time.time() + T
        while srv.stats["disconnects"] < 1 and time.time() < deadline:
            time.sleep(0.05)
        assert srv.stats["disconnects"] >= 1
    finally:
        srv.stop()


def test_control_loop_driven_through_the_server(server):
    robot = SimRobot("labkit/Detour-v0")
    robot.connect()
    with PolicyClient(server.url, timeout=T) as client:
        stats = ControlLoop(robot, client, clock=FakeClock(), inference_delay=1).run(20)
        assert stats.chunks >= 4 and len(client.latencies) == stats.chunks


# ---- who can hold a slot: silent and idle connections must not lock the token holder out ----------------
def open_silent(url, n):
    """n connections that finish the WebSocket handshake and then never say hello."""
    return [connect(url, open_timeout=T, close_timeout=0.5).__enter__() for _ in range(n)]


def close_all(conns):
    for ws in conns:
        try:
            ws.close()
        except Exception:  # noqa: BLE001
            pass


def test_silent_connections_cannot_keep_the_token_holder_out():
    # hello_timeout is long on purpose: the silent ones must not simply time out during the test
    srv = PolicyServer(small_policy(), port=0, token="tok", max_clients=4, hello_timeout=30).start()
    silent = []
    try:
        silent = open_silent(srv.url, 40)  # ten times max_clients, none of them ever says hello
        for _ in range(3):  # the token holder gets in at once, every time
            with PolicyClient(srv.url, token="tok", timeout=T) as client:
                assert client.predict_chunk([{"state": np.zeros(6, np.float32)}]).shape == (8, 2)
            silent += open_silent(srv.url, 10)  # and the flood goes on between tries
        assert srv.stats["evicted"] >= 40  # the oldest silent ones were closed to make room
    finally:
        close_all(silent)
        srv.stop()


def test_idle_clients_are_closed_and_the_token_holder_is_served():
    srv = PolicyServer(small_policy(), port=0, token="tok", max_clients=4, idle_timeout=0.3).start()
    idle = []
    try:
        for _ in range(4):  # every slot taken by clients that said hello and then went quiet
            ws = connect(srv.url, open_timeout=T, close_timeout=0.5).__enter__()
            ws.send(msgpack.packb({"type": "hello", "token": "tok"}))
            assert msgpack.unpackb(ws.recv(timeout=T))["type"] == "hello"
            idle.append(ws)
        t0 = time.time()
        with PolicyClient(srv.url, token="tok", timeout=T) as client:  # waits for a slot, then is served
            assert client.predict_chunk([{"state": np.zeros(6, np.float32)}]).shape == (8, 2)
        assert time.time() - t0 < 3.0
        for ws in idle:  # each idle one was told why it was closed
            with pytest.raises(ConnectionClosed) as info:
                ws.recv(timeout=T)
            assert info.value.rcvd is not None and info.value.rcvd.code == 4408
        assert srv.stats["idle_closed"] >= 4
    finally:
        close_all(idle)
        srv.stop()


def test_full_server_refuses_with_an_error_after_the_queue_timeout():
    srv = PolicyServer(small_policy(), port=0, max_clients=1, queue_timeout=0.2, idle_timeout=None).start()
    try:
        with PolicyClient(srv.url, timeout=T) as first:
            with pytest.raises(PolicyServerError, match="too many clients"):
                PolicyClient(srv.url, timeout=T).connect()
            assert first.predict_chunk([{"state": np.zeros(6, np.float32)}]).shape == (8, 2)
        with PolicyClient(srv.url, timeout=T) as second:  # the slot is free again once the first left
            assert second.predict_chunk([{"state": np.zeros(6, np.float32)}]).shape == (8, 2)
    finally:
        srv.stop()


def test_client_reconnects_after_an_idle_close():
    srv = PolicyServer(small_policy(), port=0, idle_timeout=0.3).start()
    try:
        with PolicyClient(srv.url, timeout=T) as client:
            assert client.predict_chunk([{"state": np.zeros(6, np.float32)}]).shape == (8, 2)
            time.sleep(0.8)  # the server closes the quiet connection meanwhile
            assert client.predict_chunk([{"state": np.zeros(6, np.float32)}]).shape == (8, 2)
        assert srv.stats["idle_closed"] >= 1
    finally:
        srv.stop()
