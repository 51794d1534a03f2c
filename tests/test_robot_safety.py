"""SafetyLayer: fuzzed commands never reach a robot out of range; watchdog (fake clock); e-stop; the
SO-101 backend against a fake motor bus."""

import json
import subprocess
import sys

import numpy as np
import pytest

import labkit  # noqa: F401
from labkit.robot import (
    FakeClock,
    FakeMotorBus,
    FakeRobot,
    SafetyConfig,
    SafetyLayer,
    SimRobot,
    SO101Arm,
)

LOW = np.array([-1.9, -1.7, -1.7, -1.6, -2.7, 0.0])
HIGH = np.array([1.9, 1.7, 1.7, 1.6, 2.8, 0.07])
WORKSPACE = ((0.02, -0.25, 0.01), (0.32, 0.25, 0.35))


START = np.array([0.0, -0.4, 0.7, 1.2, 0.0, 0.04])


def FakeArm():  # noqa: N802  (reads like the class it builds)
    """A position-controlled 6-joint arm: each command moves the joints 60% of the way there."""
    return FakeRobot(LOW, HIGH, fps=30, follow=0.6, start=START)


def planar_fk(q):
    """Grasp point of a pan + three-link planar arm (link lengths of the SO-101)."""
    pan, a1, a2, a3 = q[0], q[1], q[1] + q[2], q[1] + q[2] + q[3]
    r = 0.03 + 0.116 * np.sin(a1) + 0.135 * np.sin(a2) + 0.1 * np.sin(a3)
    z = 0.116 + 0.116 * np.cos(a1) + 0.135 * np.cos(a2) + 0.1 * np.cos(a3)
    return np.array([r * np.cos(pan), r * np.sin(pan), z])


def fuzz_commands(rng, q, n):
    """Random commands: wild, huge, NaN/inf, and plausible ones near the present pose."""
    kind = rng.integers(0, 5)
    if kind == 0:
        return rng.uniform(-3, 3, n) * (HIGH - LOW) + LOW
    if kind == 1:
        return rng.choice([-1e9, 1e9, 1e300], n) * rng.uniform(0.5, 1, n)
    if kind == 2:
        c = q + rng.normal(0, 0.05, n)
        c[rng.integers(0, n)] = rng.choice([np.nan, np.inf, -np.inf])
        return c
    if kind == 3:
        return q + rng.normal(0, 0.5, n)
    return q + rng.normal(0, 0.02, n)


def test_fuzzed_commands_never_reach_the_robot_out_of_range():
    rng = np.random.default_rng(0)
    clock, arm = FakeClock(), FakeArm()
    cfg = SafetyConfig(max_delta=0.15, max_velocity=2.0, workspace=WORKSPACE, watchdog_s=0.5)
    safe = SafetyLayer(arm, cfg, fk=planar_fk, clock=clock)
    safe.connect()
    n_cmd, out_of_range, leaked = 4000, 0, 0
    prev_sent, prev_t = None, None
    for _ in range(n_cmd):
        clock.advance(rng.uniform(0.0, 0.06))
        present = arm.q.copy()
        raw = fuzz_commands(rng, present, 6)
        bad = (not np.all(np.isfinite(raw)) or np.any(raw < LOW) or np.any(raw > HIGH)
               or np.any(np.abs(raw - present) > 0.15)
               or not np.all((planar_fk(raw) >= WORKSPACE[0]) & (planar_fk(raw) <= WORKSPACE[1])))
        before = len(arm.received)
        safe.act(raw)
        assert len(arm.received) == before + 1
        sent = arm.received[-1]
        out_of_range += bad
        ok = np.all(np.isfinite(sent)) and np.all(sent >= LOW - 1e-12) and np.all(sent <= HIGH + 1e-12)
        is_hold = np.allclose(sent, np.clip(present, LOW, HIGH))
        ok &= is_hold or np.all(np.abs(sent - present) <= 0.15 + 1e-9)
        xyz = planar_fk(sent)
        ok &= is_hold or bool(np.all((xyz >= WORKSPACE[0]) & (xyz <= WORKSPACE[1])))
        if prev_sent is not None and not is_hold:
            ok &= bool(np.all(np.abs(sent - prev_sent) <= 2.0 * (clock.now() - prev_t) + 1e-9))
        leaked += bad and not ok
        assert ok, f"unsafe command sent: raw={raw}, sent={sent}, present={present}"
        prev_sent, prev_t = sent, clock.now()
    assert out_of_range > n_cmd / 2  # the fuzz really tried
    assert leaked == 0
    s = safe.summary()
    assert s["commands"] == n_cmd and s["nonfinite"] > 100 and s["workspace"] > 100
    # velocity 2.0/s x at most one 1/30 s period = 0.067 per command, inside max_delta 0.15: the rate
    # limit binds first, so "delta" may never be logged
    assert s.get("velocity", 0) + s.get("delta", 0) > 100 and s["joint_limit"] > 100
    assert len(safe.interventions) >= s["modified"]


def test_sim_robot_fuzz_velocity_and_arm_workspace():
    rng = np.random.default_rng(1)
    robot = SimRobot("labkit/Detour-v0")
    robot.connect()
    safe = SafetyLayer(robot, SafetyConfig(max_delta=0.1), clock=FakeClock())
    prev = np.zeros(2)
    for _ in range(300):
        raw = rng.uniform(-5, 5, 2)
        if rng.random() < 0.1:
            raw[0] = np.nan
        sent = safe.act(raw)
        assert np.all(np.abs(sent) <= 0.5)
        # velocity mode: the delta is relative to the previous command; a hold (stop) is always allowed
        assert np.all(sent == 0) or np.all(np.abs(sent - prev) <= 0.1 + 1e-9)
        prev = sent
    robot.disconnect()


def test_arm_twin_workspace_through_mujoco_fk():
    robot = SimRobot("labkit/ArmPickCube-v0")
    robot.connect()
    ws = ((0.08, -0.2, 0.03), (0.3, 0.2, 0.3))
    safe = SafetyLayer(robot, SafetyConfig(max_delta=0.2, workspace=ws), fk=robot.fk, clock=FakeClock())
    rng = np.random.default_rng(2)
    for _ in range(60):
        sent = safe.act(rng.uniform(robot.spec.low, robot.spec.high))
        xyz = robot.fk(sent)
        assert np.all(xyz >= np.array(ws[0]) - 1e-9) and np.all(xyz <= np.array(ws[1]) + 1e-9)
    assert np.allclose(robot.fk(robot.hold_action()), robot.env.unwrapped.data.site("grasp").xpos, atol=1e-6)
    robot.disconnect()


def test_watchdog_holds_position_with_a_fake_clock():
    clock, arm = FakeClock(), FakeArm()
    safe = SafetyLayer(arm, SafetyConfig(watchdog_s=0.5), clock=clock)
    safe.connect()
    safe.act(arm.q + 0.1)
    clock.advance(0.4)
    assert not safe.poll()
    clock.advance(0.2)  # 0.6 s of silence > 0.5 s
    q = arm.q.copy()
    assert safe.poll()
    assert np.allclose(arm.received[-1], q) and len(arm.received) == 2  # held where it was
    assert not safe.poll()  # once per silence
    rec = safe.interventions[-1]
    assert rec.kind == "watchdog" and rec.t == pytest.approx(0.6)
    safe.act(arm.q)  # commands resume
    clock.advance(0.3)
    assert not safe.poll()


def test_estop_latches_and_refuses_commands():
    arm = FakeArm()
    safe = SafetyLayer(arm, clock=FakeClock())
    safe.connect()
    safe.act(arm.q + 0.05)
    safe.estop("test")
    held = arm.received[-1].copy()
    n = len(arm.received)
    for _ in range(5):
        assert np.allclose(safe.act(arm.q + 0.3), held)
    assert len(arm.received) == n  # nothing reached the robot
    assert [r.kind for r in safe.interventions].count("estop_refused") == 5
    safe.release_estop()
    safe.act(arm.q + 0.01)
    assert len(arm.received) == n + 1


def test_bad_input_shape_raises_values_are_clamped_and_logged(tmp_path):
    arm = FakeArm()
    log = tmp_path / "safety.jsonl"
    safe = SafetyLayer(arm, SafetyConfig(max_delta=0.1), clock=FakeClock(), log_path=log)
    safe.connect()
    with pytest.raises(ValueError, match="shape"):
        safe.act(np.zeros(5))
    q = arm.q.copy()
    sent = safe.act(np.full(6, np.nan))
    assert np.allclose(sent, q) and safe.interventions[-1].kind == "nonfinite"
    sent = safe.act(q + 1.0)
    assert np.allclose(sent, np.minimum(q + 0.1, HIGH))
    # every intervention is on disk already (flushed per record), before any close
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines) == len(safe.interventions) and lines[0]["kind"] == "nonfinite"
    with pytest.raises(ValueError, match="forward kinematics"):
        SafetyLayer(arm, SafetyConfig(workspace=WORKSPACE))
    with pytest.raises(ValueError, match="already wrapped"):
        SafetyLayer(safe)


# ---- the SO-101 backend against a fake motor bus ------------------------------------------------------
def test_lerobot_module_does_not_import_lerobot():
    code = "import sys, labkit.robot.lerobot_arm, labkit.robot; print('lerobot' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_so101_against_fake_bus_units_safety_and_estop():
    bus = FakeMotorBus(present={"shoulder_lift": -20.0, "gripper": 50.0}, speed=5.0)
    arm = SO101Arm(bus)
    arm.connect()
    assert bus.torque and arm.spec.dim == 6
    q = arm.read_joints()
    assert q[1] == pytest.approx(np.deg2rad(-20)) and q[5] == pytest.approx(0.035)  # 50 % of a 7 cm opening
    clock = FakeClock()
    safe = SafetyLayer(arm, SafetyConfig(max_delta=np.deg2rad(10), watchdog_s=0.2), clock=clock)
    safe.connect()
    target = q.copy()
    target[0] = np.deg2rad(45)  # 45 degrees away: clamped to 10 degrees per step
    safe.act(target)
    assert bus.writes[-1]["shoulder_pan"] == pytest.approx(10.0)
    assert bus.writes[-1]["gripper"] == pytest.approx(50.0)
    for _ in range(10):
        safe.act(target)
    assert bus.present["shoulder_pan"] == pytest.approx(45.0, abs=1e-6)
    target[5] = 5.0  # far beyond the gripper range: clamped to the 7 cm limit = 100 %
    safe.act(target)
    assert bus.writes[-1]["gripper"] <= 100.0 + 1e-9
    clock.advance(0.3)
    n = len(bus.writes)
    assert safe.poll() and len(bus.writes) == n + 1  # watchdog wrote the present position as the goal
    safe.estop()
    assert all(bus.goal[m] == pytest.approx(bus.present[m]) for m in bus.motors)  # held where it is
    safe.act(target)
    assert len(bus.writes) == n + 2  # the e-stop hold only
    safe.disconnect()
    assert not bus.is_connected and not bus.torque


def test_so101_without_lerobot_gives_a_clear_error():
    arm = SO101Arm(port="/dev/null-port")
    try:
        import lerobot  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="lerobot"):
            arm.connect()
    with pytest.raises(ValueError, match="bus"):
        SO101Arm()
    leader = SO101Arm(FakeMotorBus(present={"elbow_flex": 30.0}), leader=True)
    leader.connect()
    assert not leader.bus.torque and leader.read_joints()[2] == pytest.approx(np.deg2rad(30))
    with pytest.raises(RuntimeError, match="leader"):
        leader.act(np.zeros(6))


def test_reset_forgets_the_last_command_so_the_next_episode_starts_from_the_robot():
    # A velocity limit compares each command with the previous one. Across a reset the previous one
    # belongs to the old episode: limiting toward it would *move* a robot asked to hold.
    class ResettableArm(FakeRobot):
        def reset(self, seed=None):
            self.q = np.array([0.08, -0.4, 0.7, 1.2, 0.0, 0.04])

    clock, arm = FakeClock(), ResettableArm(LOW, HIGH, follow=0.6, start=START)
    safe = SafetyLayer(arm, SafetyConfig(max_velocity=1.0, watchdog_s=None), clock=clock)
    safe.connect()
    for _ in range(20):  # drive the pan joint far from where the next episode starts
        clock.advance(0.1)
        safe.act(np.array([0.8, -0.4, 0.7, 1.2, 0.0, 0.04]))
    safe.reset(seed=1)
    clock.advance(0.1)
    hold = arm.hold_action()
    sent = safe.act(hold)
    np.testing.assert_allclose(sent, hold)  # without the reset it was rate-limited toward pan 0.8


def test_control_loop_holds_when_its_policy_source_fails():
    from labkit.robot import ControlLoop

    class Broken:
        def __init__(self):
            self.calls = 0

        def predict_chunk(self, history):
            self.calls += 1
            if self.calls > 1:
                raise ConnectionError("policy server gone")
            return np.tile(np.array([0.3, -0.4, 0.7, 1.2, 0.0, 0.04]), (4, 1))

    clock, arm = FakeClock(), FakeArm()
    loop = ControlLoop(arm, Broken(), fps=30, clock=clock, mode="none", execute_steps=4, threaded=False)
    with pytest.raises(ConnectionError, match="policy server gone"):
        loop.run(20)
    # The last command was a hold (the arm's present position), not the chunk's target it was moving to.
    assert not np.allclose(arm.received[-2], arm.received[-1])
    np.testing.assert_allclose(arm.received[-1], arm.q, atol=1e-12)


# ---- a pause must not bank motion (issue "Hardening" item 6) -------------------------------------------
@pytest.mark.parametrize("pause", ["silence", "watchdog", "estop"])
def test_velocity_limit_holds_after_a_pause(pause):
    """With max_velocity and no max_delta, the time since the last command used to count in full: after a
    5 s pause one command moved a joint 1.9 rad. The time counts for at most one control period."""
    clock = FakeClock()
    arm = FakeRobot(LOW, HIGH, fps=30, follow=1.0, start=START)
    cfg = SafetyConfig(max_velocity=1.0, watchdog_s=0.5 if pause == "watchdog" else None)
    safe = SafetyLayer(arm, cfg, clock=clock)
    safe.connect()
    bound = 1.0 * arm.spec.dt + 1e-9
    for _ in range(5):  # a normal stream first
        clock.advance(arm.spec.dt)
        safe.act(START)
    if pause == "estop":
        safe.estop("pause")
        safe.release_estop()
    clock.advance(5.0)
    if pause == "watchdog":
        assert safe.poll()  # the watchdog trips and holds (it forgets the last command, not its time)
    before = arm.q.copy()
    far = START.copy()
    far[0] = 1.9  # 1.9 rad away on the pan joint
    sent = safe.act(far)
    assert np.all(np.abs(sent - before) <= bound), f"one command moved {np.abs(sent - before).max():.3f} rad"
    assert safe.verify(sent, clock.now(), before) or np.allclose(sent, before)
    # and the next commands keep the rate: one period of motion per period
    for _ in range(3):
        clock.advance(arm.spec.dt)
        prev = arm.q.copy()
        sent = safe.act(far)
        assert np.all(np.abs(sent - prev) <= bound)
