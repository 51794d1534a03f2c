"""The multi-task tabletop with two bodies (labkit/envs/tabletop.py) and human-to-robot co-training
(labkit/policies/cotrain.py): tasks, bodies, experts, the batch mixing arithmetic, named errors, and a
tiny end-to-end run."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import labkit  # noqa: F401  (registers the envs, picks a headless GL backend)
from labkit.envs.tabletop import COLOURS, HUMAN_VIEW, TASKS, ZONES, demos, task_code, task_index
from labkit.eval import evaluate, rollout
from labkit.policies import policy_from_checkpoint
from labkit.policies.cotrain import CotrainPolicy, MixingError, batch_counts, cotrain, mix_batch

ENV = "labkit/Tabletop-v0"


# ---- tasks and bodies -------------------------------------------------------------------------------
def test_tasks_are_colour_corner_compositions():
    assert len(TASKS) == len(set(TASKS)) == len(COLOURS) * len(ZONES) == 12
    assert TASKS[task_index("push the blue block to the top-right corner")] == "push the blue block to the top-right corner"
    for i in range(len(TASKS)):
        code = task_code(i)
        colour, zone = COLOURS[int(np.argmax(code[:3]))], list(ZONES)[int(np.argmax(code[3:]))]
        assert code.sum() == 2 and TASKS[i] == f"push the {colour} block to the {zone} corner"


def test_task_string_per_episode_and_allowed_list():
    env = gym.make(ENV, tasks=[2, TASKS[7]])
    seen = set()
    for seed in range(20):
        obs, info = env.reset(seed=seed)
        assert info["task"] == TASKS[info["task_index"]] == env.unwrapped.task
        np.testing.assert_array_equal(obs["state"][-7:], task_code(info["task_index"]))
        seen.add(info["task_index"])
    assert seen == {2, 7}  # drawn from the allowed list only, both of them
    _, info = env.reset(seed=0, options={"task": 11})
    assert info["task_index"] == 11
    _, info = gym.make(ENV, task=TASKS[4]).reset(seed=3)
    assert info["task"] == TASKS[4]


@pytest.mark.parametrize("body", ["robot", "human"])
def test_expert_succeeds_on_every_task(body):
    rates = [np.mean([e.success for e in rollout("expert", ENV, range(10_000, 10_003), {"embodiment": body, "task": t})])
             for t in range(len(TASKS))]
    assert min(rates) == 1.0, f"{body} expert success per task: {rates}"  # 30/30 per task measured


def test_human_action_space_and_dynamics_differ():
    robot, human = gym.make(ENV, embodiment="robot"), gym.make(ENV, embodiment="human")
    assert robot.action_space.high[0] == pytest.approx(0.05) and human.action_space.high[0] == pytest.approx(0.3)
    moved = {}
    for name, env in (("robot", robot), ("human", human)):
        env.reset(seed=5)
        start = env.unwrapped.effector()
        for _ in range(3):
            env.step(np.array([0.03, 0.0], np.float32))
        moved[name] = env.unwrapped.effector() - start
    # The robot's action is a world-frame offset of its target; the human's a velocity in its own turned
    # frame: the same numbers move the robot along world x and the hand along world y, by other amounts.
    # (robot: three 3 cm target offsets; hand: 3 cm/s for 0.3 s, about 9 mm)
    assert moved["robot"][0] > 0.05 and abs(moved["robot"][1]) < 0.005
    assert 0.005 < moved["human"][1] < 0.012 and abs(moved["human"][0]) < 0.003


def test_human_viewpoint_differs():
    robot, human = gym.make(ENV, embodiment="robot"), gym.make(ENV, embodiment="human")
    ro, _ = robot.reset(seed=9)
    ho, _ = human.reset(seed=9)
    world = robot.unwrapped.blocks()
    np.testing.assert_allclose(human.unwrapped.blocks(), world)  # the same scene ...
    np.testing.assert_allclose(ro["state"][4:10], world.ravel(), atol=1e-6)  # ... the robot sees in the world frame,
    angle, origin = HUMAN_VIEW
    c, s = np.cos(angle), np.sin(angle)
    seen = (world - origin) @ np.array([[c, -s], [s, c]])
    np.testing.assert_allclose(ho["state"][4:10], seen.ravel(), atol=1e-6)  # ... the hand in its own
    assert np.abs(ho["state"][4:10] - ro["state"][4:10]).max() > 0.02


def test_bad_env_options_are_named():
    with pytest.raises(ValueError, match="unknown task"):
        gym.make(ENV, task="push the purple block to the top-left corner")
    with pytest.raises(ValueError, match="unknown task"):
        gym.make(ENV, tasks=[0, 12])
    with pytest.raises(ValueError, match="unknown task"):
        gym.make(ENV, task=True)
    with pytest.raises(ValueError, match="embodiment"):
        gym.make(ENV, embodiment="dog")
    with pytest.raises(ValueError, match="not both"):
        gym.make(ENV, task=0, tasks=[1])
    with pytest.raises(ValueError, match="non-empty list"):
        gym.make(ENV, tasks=[])
    with pytest.raises(ValueError, match="unknown task"):
        gym.make(ENV).reset(seed=0, options={"task": "stack the blocks"})


# ---- the batch mixing -------------------------------------------------------------------------------
def test_batch_counts_by_hand():
    assert batch_counts({"robot": 0.5, "human": 0.5}, 256) == {"robot": 128, "human": 128}
    assert batch_counts({"a": 0.7, "b": 0.2, "c": 0.1}, 10) == {"a": 7, "b": 2, "c": 1}
    # floors 3, 3, 3; the one left over goes to the earliest of the tied remainders
    assert batch_counts({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, 10) == {"a": 4, "b": 3, "c": 3}
    # 6 * (0.8, 0.2) = (4.8, 1.2): floors 4 and 1, the leftover to the larger remainder (0.8)
    assert batch_counts({"robot": 0.8, "human": 0.2}, 6) == {"robot": 5, "human": 1}
    assert batch_counts({"robot": 1.0, "human": 0.0}, 7) == {"robot": 7, "human": 0}


@pytest.mark.parametrize("weights, match", [
    ({"robot": 0.7, "human": 0.7}, "sum to 1"),
    ({"robot": 1.5, "human": -0.5}, ">= 0"),
    ({"robot": float("nan"), "human": 1.0}, ">= 0"),
    ({}, "no source"),
])
def test_bad_weights_are_named(weights, match):
    with pytest.raises(MixingError, match=match):
        batch_counts(weights, 8)


def test_mix_batch_proportions_and_sources():
    windows = {name: {"obs": {"observation.state": torch.full((n, 1, 3), float(tag))}, "action": torch.arange(n)[:, None, None].float().expand(n, 2, 2),
                      "action_is_pad": torch.zeros(n, 2, dtype=torch.bool)}
               for name, n, tag in (("robot", 50, 1), ("human", 7, 2))}
    g = torch.Generator().manual_seed(0)
    batch = mix_batch(windows, {"robot": 0.75, "human": 0.25}, 64, g)
    assert len(batch["robot"]["action"]) == 48 and len(batch["human"]["action"]) == 16
    assert (batch["robot"]["obs"]["observation.state"] == 1).all() and (batch["human"]["obs"]["observation.state"] == 2).all()
    assert batch["human"]["action"].max() < 7  # drawn from the human's 7 windows only
    again = mix_batch(windows, {"robot": 0.75, "human": 0.25}, 64, torch.Generator().manual_seed(0))
    assert torch.equal(again["robot"]["action"], batch["robot"]["action"])
    assert "human" not in mix_batch(windows, {"robot": 1.0}, 64, g)
    with pytest.raises(MixingError, match="not among the sources"):
        mix_batch(windows, {"robot": 0.5, "dog": 0.5}, 64, g)


# ---- end to end -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sources():
    return {"robot": demos("robot", [1], 3), "human": demos("human", [0], 3)}


def test_demos_carry_tasks(sources):
    robot, human = sources["robot"], sources["human"]
    assert robot.tasks == list(TASKS) and set(robot.frames["task_index"]) == {1} and set(human.frames["task_index"]) == {0}
    assert robot.info["labkit"]["env_kwargs"] == {"embodiment": "robot", "instruction": "code"}
    with pytest.raises(ValueError, match="episodes_per_task"):
        demos("robot", [0], 0)


def test_tiny_cotraining_run(sources, tmp_path):
    policy = CotrainPolicy.from_sources(sources, hidden=32, layers=2)
    assert policy.heads["robot"].out_features == policy.config.horizon * 2
    calls = []

    def mixer(windows, weights, batch_size, generator):  # the lesson injects the student's mixer like this
        calls.append(sorted(weights))
        return mix_batch(windows, weights, batch_size, generator)

    cotrain(policy, sources, {"robot": 0.5, "human": 0.5}, steps=60, batch_size=32, mixer=mixer, progress=False)
    assert len(calls) == 60 and calls[0] == ["human", "robot"]
    losses = policy.losses()
    assert np.isfinite(losses).all() and losses[-10:].mean() < losses[:10].mean()
    res = evaluate(policy, ENV, episodes=2, env_kwargs={"tasks": [0]}, progress=False)
    assert res.episodes == 2
    # the checkpoint rebuilds both heads and the human's normaliser
    again = policy_from_checkpoint(policy.checkpoint())
    obs = {"observation.state": torch.as_tensor(sources["robot"].frames["observation.state"][:4, None])}
    torch.testing.assert_close(again.predict_action_chunk(obs), policy.predict_action_chunk(obs))
    with pytest.raises(MixingError, match="not among the sources"):
        cotrain(policy, sources, {"robot": 0.5, "dog": 0.5}, steps=1, progress=False)
    with pytest.raises(MixingError, match="sum to 1"):
        cotrain(policy, sources, {"robot": 0.5}, steps=1, progress=False)
    with pytest.raises(ValueError, match="unknown embodiment"):
        CotrainPolicy.from_sources({**sources, "dog": sources["human"]})


def test_retargeted_human_data_reads_as_the_robots(sources):
    from labkit.envs.tabletop import retarget_human

    human = sources["human"]
    mapped = retarget_human(human)
    env = gym.make(ENV, embodiment="robot", task=0)
    env.reset(seed=10_000)  # the human dataset's first episode started from this seed (demos' seed rule)
    np.testing.assert_allclose(mapped.frames["observation.state"][0, 4:10], env.unwrapped.blocks().ravel(), atol=1e-5)
    assert np.abs(mapped.frames["observation.state"][0, 4:10] - human.frames["observation.state"][0, 4:10]).max() > 0.02
    # a hand velocity (m/s, its frame) becomes a world-frame target offset (m) over one 0.1 s step
    v = human.frames["action"][5]
    angle = HUMAN_VIEW[0]
    c, s = np.cos(angle), np.sin(angle)
    np.testing.assert_allclose(mapped.frames["action"][5], np.array([[c, -s], [s, c]]) @ v * 0.1, atol=1e-6)
    assert mapped.info["labkit"]["env_kwargs"] == {"embodiment": "robot"}
