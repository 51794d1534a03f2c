"""Real-robot deployment: the robot contract, a MuJoCo twin, the SO-100/101 arm, an always-on safety
layer, a fixed-rate chunk-executing control loop, teleoperation, recording/replay and a policy server.

    robot = SimRobot("labkit/ArmPickCube-v0", real=True)      # or SO101Arm(port="/dev/ttyACM0", cameras=...)
    robot.connect()
    check_policy_matches_robot(policy, robot)                 # what it reads = what the robot observes (the loop does it too)
    safe = SafetyLayer(robot, SafetyConfig(max_delta=0.1), fk=robot.fk)
    ControlLoop(safe, policy, mode="rtc").run(steps=300)      # policy: labkit policy or PolicyClient

LeRobot is never imported here; `SO101Arm` imports it only when it must build a real motor bus, and
`opencv_camera` when it builds a real camera (`cameras={"top": opencv_camera(0), "wrist": opencv_camera(2)}`).
Teleop widgets and the policy server import ipywidgets/websockets only when used.
"""

from labkit.robot.base import FakeClock, FakeRobot, NotConnectedError, RealClock, Robot, RobotSpec
from labkit.robot.check import check_policy_matches_robot
from labkit.robot.control import ChunkBlender, ControlLoop, LoopStats, PolicyRunner
from labkit.robot.lerobot_arm import FakeCamera, FakeMotorBus, SO101Arm, center_crop_resize, opencv_camera
from labkit.robot.record import record_episodes, replay
from labkit.robot.safety import Intervention, SafetyConfig, SafetyLayer
from labkit.robot.sim import SimRobot
from labkit.robot.teleop import KeyboardTeleop, LeaderArm, SliderTeleop


def __getattr__(name: str):  # the server needs websockets/msgpack: import it on first use
    if name in ("PolicyServer", "PolicyClient", "PolicyServerError"):
        from labkit.robot import server

        return getattr(server, name)
    raise AttributeError(f"module 'labkit.robot' has no attribute {name!r}")


__all__ = ["Robot", "RobotSpec", "RealClock", "FakeClock", "FakeRobot", "NotConnectedError", "SimRobot", "SO101Arm", "FakeMotorBus",
           "FakeCamera", "opencv_camera", "center_crop_resize", "check_policy_matches_robot",
           "SafetyLayer", "SafetyConfig", "Intervention", "ControlLoop", "ChunkBlender", "LoopStats", "PolicyRunner",
           "KeyboardTeleop", "SliderTeleop", "LeaderArm", "record_episodes", "replay", "PolicyServer", "PolicyClient",
           "PolicyServerError"]
