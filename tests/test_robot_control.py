"""Control loop timing with a fake clock, chunk alignment and blending, SimRobot's gaps, teleop."""

import numpy as np
import pytest

import labkit
from labkit.robot import (
    ChunkBlender,
    ControlLoop,
    FakeClock,
    FakeMotorBus,
    KeyboardTeleop,
    LeaderArm,
    RobotSpec,
    SafetyConfig,
    SafetyLayer,
    SimRobot,
    SO101Arm,
)


class StepRobot:
    """A 1-joint velocity robot whose observation is the number of commands it has received."""

    def __init__(self):
        self.spec = RobotSpec(("j",), [-1e6], [1e6], fps=10, action_mode="velocity")
        self.sent: list[float] = []

    def connect(self):
        pass

    def disconnect(self):
        pass

    def observe(self):
        return {"state": np.array([len(self.sent)], np.float32)}

    def hold_action(self):
        return np.zeros(1)

    def act(self, a):
        self.sent.append(float(a[0]))
        return np.asarray(a)


class ClockedSource:
    """A chunk source whose action i of a chunk computed at step t is t + i (absolute time), and
    which spends `compute_s` of fake-clock time per chunk."""

    horizon, obs_horizon, n_action_steps = 8, 1, 4

    def __init__(self, clock, compute_s=0.0, offset=0.0):
        self.clock, self.compute_s, self.offset, self.calls = clock, compute_s, offset, 0

    def predict_chunk(self, history):
        self.calls += 1
        self.clock.advance(self.compute_s)
        t = float(history[-1]["state"][0])
        return (t + np.arange(self.horizon) + self.offset * (self.calls % 2))[:, None]


def test_blender_modes_hand_computed():
    a = np.arange(8.0)[:, None]
    b = 100 + np.arange(8.0)[:, None]
    ens = ChunkBlender("ensemble", ensemble_coeff=0.5)
    ens.add(a, 0, 0)
    ens.add(b, 2, 2)
    w = np.exp(-0.5 * np.arange(2))
    assert ens.action(3)[0] == pytest.approx((w[0] * 3 + w[1] * 101) / w.sum())
    rtc = ChunkBlender("rtc", blend_steps=3)
    rtc.add(a, 0, 0)
    rtc.add(b, 2, 4)  # computed from step 2's observation, arrived at step 4: actions 0-1 are stale
    assert rtc.action(3)[0] == 3  # not arrived yet
    assert rtc.action(4)[0] == pytest.approx(0.75 * 4 + 0.25 * 102)
    assert rtc.action(5)[0] == pytest.approx(0.5 * 5 + 0.5 * 103)
    assert rtc.action(7)[0] == 105  # fully switched
    none = ChunkBlender("none")
    none.add(a, 0, 0)
    none.add(b, 2, 4)
    assert none.action(4)[0] == 102
    assert none.action(20) is None
    with pytest.raises(ValueError, match="mode"):
        ChunkBlender("average")


@pytest.mark.parametrize("mode", ["none", "rtc", "ensemble"])
@pytest.mark.parametrize("threaded", [False, True])
def test_chunks_are_aligned_to_their_observation(mode, threaded):
    """With a d-step inference delay the stale actions are skipped: step k executes action k."""
    clock, robot = FakeClock(), StepRobot()
    loop = ControlLoop(robot, ClockedSource(clock), clock=clock, mode=mode, inference_delay=2, threaded=threaded,
                       execute_steps=4 if mode != "ensemble" else 2)
    stats = loop.run(40)
    assert robot.sent == pytest.approx(list(range(40)))
    assert stats.starved == 0 and stats.chunks >= 9


def test_rtc_blending_removes_the_jump_that_switching_makes():
    def max_jump(mode):
        clock, robot = FakeClock(), StepRobot()
        ControlLoop(robot, ClockedSource(clock, offset=5.0), clock=clock, mode=mode, inference_delay=1,
                    threaded=False, blend_steps=3).run(40)
        return np.abs(np.diff(robot.sent) - 1).max()

    assert max_jump("none") == pytest.approx(5.0)  # every other chunk is shifted by 5
    assert max_jump("rtc") < 2.0


def test_fixed_rate_timing_with_a_fake_clock():
    clock, robot = FakeClock(), StepRobot()
    stats = ControlLoop(robot, ClockedSource(clock, compute_s=0.03), clock=clock, inference_delay=0,
                        threaded=False).run(50)
    assert stats.steps == 50 and stats.mean_hz == pytest.approx(10.0)
    assert stats.jitter_max_ms == pytest.approx(0.0, abs=1e-6) and stats.overruns == 0
    assert stats.inference_p50_ms == pytest.approx(30.0)
    # a policy slower than the period: late ticks are counted, and the loop does not burst to catch up
    clock, robot = FakeClock(), StepRobot()
    stats = ControlLoop(robot, ClockedSource(clock, compute_s=0.25), clock=clock, inference_delay=0,
                        threaded=False, execute_steps=1, mode="ensemble").run(10)
    assert stats.overruns >= 8 and stats.mean_hz == pytest.approx(4.0, rel=0.01)
    assert stats.jitter_p50_ms == pytest.approx(150.0, abs=1e-3)


def test_loop_validates_and_stops_on_estop():
    clock, robot = FakeClock(), StepRobot()
    with pytest.raises(ValueError, match="horizon"):
        ControlLoop(robot, ClockedSource(clock), clock=clock, execute_steps=8, inference_delay=2)
    with pytest.raises(TypeError, match="policy"):
        ControlLoop(robot, object(), clock=clock)
    safe = SafetyLayer(robot, clock=clock)
    calls = []

    def teleop(obs):
        calls.append(1)
        if len(calls) == 5:
            safe.estop("test")
        return np.ones(1)

    stats = ControlLoop(safe, teleop, clock=clock).run(20)
    assert stats.steps == 6 and len(robot.sent) == 5  # 4 commands and the e-stop hold
    assert robot.sent[-1] == 0.0


def test_sim_robot_latency_noise_gap_and_real_variant():
    robot = SimRobot("labkit/Detour-v0", latency_steps=2)
    robot.connect()
    x0 = robot.observe()["state"][:2].copy()
    robot.act([0.5, 0.0])
    robot.act([0.5, 0.0])
    assert np.allclose(robot.observe()["state"][:2], x0)  # the commands have not run yet
    robot.act([0.0, 0.0])
    assert robot.observe()["state"][0] > x0[0] + 1e-3
    # actuation gap: half gain moves about half as far
    dist = {}
    for gain in (1.0, 0.5):
        r = SimRobot("labkit/Detour-v0", gain=gain)
        r.connect()
        start = r.observe()["state"][0]
        for _ in range(5):
            r.act([0.3, 0.0])
        dist[gain] = r.observe()["state"][0] - start
    assert dist[0.5] == pytest.approx(dist[1.0] / 2, rel=0.15)
    deadband = SimRobot("labkit/Detour-v0", deadband=0.1)
    deadband.connect()
    start = deadband.observe()["state"][0]
    deadband.act([0.05, 0.0])
    assert deadband.observe()["state"][0] == pytest.approx(start, abs=1e-6)  # below the deadband: no motion
    noisy = SimRobot("labkit/Detour-v0", sensor_noise=0.01)
    noisy.connect()
    draws = np.stack([noisy.observe()["state"] for _ in range(400)])
    assert draws.std(0)[:2] == pytest.approx([0.01, 0.01], rel=0.2)
    real = SimRobot("labkit/Detour-v0", real=True)
    real.connect()
    assert real.latency_steps == 1 and real.sensor_noise > 0
    assert np.allclose(real.env.unwrapped.model.dof_damping, SimRobot("labkit/Detour-v0").env.unwrapped.model.dof_damping * 1.5)
    with pytest.raises(ValueError, match="shape"):
        real.act([0.1])
    # deterministic given the seed
    a, b = SimRobot("labkit/PegInsert-v0"), SimRobot("labkit/PegInsert-v0")
    a.connect(), b.connect()
    assert np.array_equal(a.reset(3)["state"], b.reset(3)["state"])


def test_control_loop_runs_a_labkit_policy_on_the_sim_twin():
    from labkit.policies.bc import BCPolicy

    z = lambda n, v: [v] * n  # noqa: E731
    stats = {"observation.state": {"mean": z(6, 0.0), "std": z(6, 1.0), "min": z(6, -1.0), "max": z(6, 1.0)},
             "action": {"min": z(2, -0.5), "max": z(2, 0.5), "mean": z(2, 0.0), "std": z(2, 1.0)}}
    policy = BCPolicy({"obs_horizon": 2, "horizon": 8, "n_action_steps": 4, "hidden": 32, "layers": 2},
                      {"observation.state": [6], "action": [2]}, stats)
    robot = SimRobot("labkit/Detour-v0")
    robot.connect()
    clock = FakeClock()
    loop = ControlLoop(robot, policy, clock=clock, inference_delay=1, safety=SafetyConfig(max_delta=0.2))
    stats = loop.run(30)
    assert stats.steps >= 1 and stats.chunks >= 1 and loop.robot.counts["commands"] == stats.steps


def test_keyboard_and_leader_arm_mappings():
    spec = RobotSpec(("a", "b"), [-1, -1], [1, 1], fps=10)
    kb = KeyboardTeleop(spec, start=[0.0, 0.0], step=0.1)
    for key in "qqqw?":
        kb.press(key)
    assert kb() == pytest.approx([0.3, 0.1])
    for _ in range(30):
        kb.press("a")
    assert kb()[0] == pytest.approx(-1.0)  # clipped at the limit
    stops = []
    kb.on_estop = lambda: stops.append(1)
    kb.press(" ")
    kb.press("0")
    assert stops == [1] and kb() == pytest.approx([0.0, 0.0])
    with pytest.raises(ValueError, match="start"):
        KeyboardTeleop(spec)
    arm = SO101Arm(FakeMotorBus(present={"wrist_flex": 12.0}))
    arm.connect()
    assert KeyboardTeleop.for_robot(arm)()[3] == pytest.approx(np.deg2rad(12.0))
    vel = KeyboardTeleop(RobotSpec(("a",), [-1], [1], fps=10, action_mode="velocity"), step=0.5)
    vel.press("q")
    assert vel() == pytest.approx([0.5]) and vel() == pytest.approx([0.0])  # one step only
    leader = FakeMotorBus(present={"shoulder_pan": 10.0, "elbow_flex": -30.0})
    lead = SO101Arm(leader, leader=True)
    lead.connect()
    follower = SO101Arm(FakeMotorBus())
    mapping = LeaderArm(lead.read_joints, scale=[-1, 1, 1, 1, 1, 1], spec=follower.spec)
    pose = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.03])
    mapping.calibrate(pose)
    assert mapping() == pytest.approx(pose)
    leader.present["shoulder_pan"] += 20.0  # the leader moves 20 degrees; the mirrored follower joint follows
    assert mapping()[0] == pytest.approx(0.1 - np.deg2rad(20))


def test_slider_panel_drives_the_arm():
    pytest.importorskip("ipywidgets")
    from labkit.robot import SliderTeleop

    bus = FakeMotorBus(speed=1000.0)
    arm = SO101Arm(bus)
    arm.connect()
    panel = SliderTeleop(arm, clock=FakeClock())
    panel.sliders[0].value = 0.3
    assert panel()[0] == pytest.approx(0.3)
    stats = panel.loop.run(3)  # a bare robot gets max_delta 0.05 rad per step: the jump is spread out
    assert stats.steps == 3 and bus.writes[-1]["shoulder_pan"] == pytest.approx(np.rad2deg(0.15))
    panel.loop.run(5)
    assert bus.writes[-1]["shoulder_pan"] == pytest.approx(np.rad2deg(0.3))
    panel.estop()
    assert panel.robot.estopped and "E-STOP" in panel.status.value


def test_arm_twin_expert_through_the_loop():
    robot = SimRobot("labkit/ArmPickCube-v0", real=True)
    robot.connect()
    expert = labkit.envs.expert(robot.env)
    expert.reset(seed=0)
    safe = SafetyLayer(robot, SafetyConfig(max_delta=0.3), fk=robot.fk, clock=FakeClock())
    stats = ControlLoop(safe, expert).run(40)
    assert stats.steps == 40 and robot.spec.action_mode == "position" and robot.spec.dim == 6


def test_loop_runs_handed_in_blends():
    """`rtc_fn=` and `ensemble_fn=` are the blends the loop runs: written out, the commands are identical to
    labkit's; a wrong blend (the oldest chunk's action, the newest never ramped in) shows in the commands."""
    from labkit.robot.control import rtc_blend, temporal_ensemble

    def rtc(live, step, blend_steps):
        old, new = live[0], live[-1]
        w = 1.0 if len(live) == 1 or blend_steps == 0 else min(1.0, (step - new[1] + 1) / (blend_steps + 1))
        return (1 - w) * old[2][step - old[0]] + w * new[2][step - new[0]] if w < 1 else new[2][step - new[0]]

    def ensemble(actions, m):
        w = np.exp(-m * np.arange(len(actions)))
        return w @ actions / w.sum()

    def oldest(live, step, blend_steps):
        return live[0][2][step - live[0][0]]

    def sent(mode, **fns):
        clock, robot = FakeClock(), StepRobot()
        ControlLoop(robot, ClockedSource(clock, offset=5.0), clock=clock, mode=mode, inference_delay=1,
                    threaded=False, blend_steps=3, ensemble_coeff=0.3, **fns).run(40)
        return np.array(robot.sent)

    np.testing.assert_array_equal(sent("rtc", rtc_fn=rtc), sent("rtc"))
    np.testing.assert_allclose(sent("ensemble", ensemble_fn=ensemble), sent("ensemble"), atol=1e-12)
    assert np.abs(sent("rtc", rtc_fn=oldest) - sent("rtc")).max() >= 1.0
    live = [(0, 0, np.arange(8.0)[:, None]), (2, 4, 100 + np.arange(8.0)[:, None])]
    assert rtc_blend(live, 4, 3)[0] == pytest.approx(0.75 * 4 + 0.25 * 102)
    assert temporal_ensemble(np.array([[0.0], [3.0]]), np.log(2))[0] == pytest.approx(1.0)
