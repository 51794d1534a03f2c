"""Commands at several levels (labelled from the expert's episodes), the scripted reasoner, and the
runtime that steers a language-conditioned policy on Tabletop."""

import gymnasium as gym
import numpy as np
import pytest
import torch

import labkit.envs  # noqa: F401
from labkit.envs.tabletop import TASKS, from_pixel, servo_step, to_pixel
from labkit.envs.tabletop import demos as tabletop_demos
from labkit.eval import rollout
from labkit.language import VocabEncoder
from labkit.language.commands import (
    HELD_OUT_TEMPLATES,
    MOTION_STEPS,
    TRAIN_TEMPLATES,
    ScriptedReasoner,
    label_episode,
    motion_text,
    parse_motion,
    parse_point,
    point_command,
    task_text,
)
from labkit.language.steer import (
    TEXT_KEY,
    LanguageRuntime,
    LearnedReasoner,
    command_dataset,
    controllability,
    episode_tasks,
)
from labkit.policies import BCPolicy


@pytest.fixture(scope="module")
def demos():
    return tabletop_demos("robot", [0, 5, 11], 2, seed=0, instruction="text")


def test_text_mode_hides_the_task_from_the_state():
    env = gym.make("labkit/Tabletop-v0", instruction="text", task=7)
    obs, _ = env.reset(seed=0)
    assert obs["state"].shape == (10,) and obs["task"].tolist() == [7]
    assert env.observation_space.contains(obs)
    with pytest.raises(ValueError, match="instruction"):
        gym.make("labkit/Tabletop-v0", instruction="words")


def test_motion_commands_round_trip():
    assert motion_text(-3, 2) == "move 3 cm left and 2 cm up"
    assert motion_text(0, -4) == "move 4 cm down"
    assert motion_text(0, 0) == "hold still"
    for dx, dy in [(-3, 2), (0, -4), (5, 0), (0, 0)]:
        np.testing.assert_allclose(parse_motion(motion_text(dx, dy)), [dx / 100, dy / 100])
    with pytest.raises(ValueError, match="not a motion command"):
        parse_motion("push the red block to the top-left corner")


def test_pixels_match_the_camera():
    """to_pixel agrees with where the top camera draws a block (its red pixels' centroid), to a pixel."""
    env = gym.make("labkit/Tabletop-v0", obs_mode="pixels", image_size=64)
    obs, _ = env.reset(seed=3)
    img = obs["pixels"].astype(int)
    red = (img[..., 0] > 150) & (img[..., 1] < 100) & (img[..., 2] < 100)
    v, u = np.nonzero(red)
    np.testing.assert_allclose(to_pixel(env.unwrapped.blocks()[0], 64), [u.mean(), v.mean()], atol=1.0)
    np.testing.assert_allclose(from_pixel(to_pixel([0.05, -0.1])), [0.05, -0.1], atol=0.011)
    assert parse_point(point_command(np.array([0.0, 0.0]))) == (32, 32)


def test_servo_model_predicts_the_pusher(demos):
    """The reasoner's servo equation, fed the expert's recorded actions, lands within 5 mm of where the
    simulator put the pusher four steps later."""
    s, a = np.asarray(demos.frames["observation.state"], float), np.asarray(demos.frames["action"], float)
    errors = []
    for i in range(0, demos.episode_to[0] - MOTION_STEPS):
        p, v = s[i, :2], s[i, 2:4]
        for k in range(MOTION_STEPS):
            p, v = servo_step(p, v, a[i + k])
        errors.append(np.linalg.norm(p - s[i + MOTION_STEPS, :2]))
    assert np.max(errors) < 0.005, np.max(errors)


def test_labels_follow_the_expert(demos):
    s = np.asarray(demos.frames["observation.state"])
    a, b = demos.episode_from[0], demos.episode_to[0]
    task = episode_tasks(demos)[0]
    labels = label_episode(s[a:b], task)
    assert set(labels) == {"task", "subtask", "motion", "point"}
    assert all(len(v) == b - a for v in labels.values())
    # the episode starts away from the block and ends pushing it
    assert labels["subtask"][0].startswith("get behind the red block") and labels["subtask"][-2].startswith("push")
    # the motion label is the recorded displacement four steps on, to the centimetre
    moved = s[a + MOTION_STEPS, :2] - s[a, :2]
    np.testing.assert_allclose(parse_motion(labels["motion"][0]), moved, atol=0.0051)
    assert episode_tasks(demos) == [0, 0, 5, 5, 11, 11]
    assert labels["task"][0] == task_text(0) == TASKS[0]
    # one level alone is that level's labels, and only it is computed; a bad level is named
    assert label_episode(s[a:b], task, levels=("motion",)) == {"motion": labels["motion"]}
    with pytest.raises(ValueError, match="'gesture'"):
        label_episode(s[a:b], task, levels=("gesture",))


def test_command_dataset_embeds_every_level(demos):
    enc = VocabEncoder(list(TASKS) + list(TRAIN_TEMPLATES) + ["get behind facing into move cm left right up down "
                                                              "hold still to pixel"] + [str(i) for i in range(64)],
                       width=8, unknown="unk")
    cd = command_dataset(demos, enc, ["task", "motion"])
    assert len(cd) == 2 * len(demos) and cd.frames[TEXT_KEY].shape == (len(cd), 8)
    said = [cd.tasks[int(i)] for i in cd.frames["task_index"]]
    # the task level takes the templates in turn, episode by episode; the dataset records what was said
    first = [said[i] for i in cd.episode_from[:2]]
    assert first == [task_text(0, TRAIN_TEMPLATES[0]), task_text(0, TRAIN_TEMPLATES[1])]
    assert said[len(demos)].startswith(("move", "hold"))
    row = int(np.flatnonzero(np.array(said) == said[len(demos)])[0])
    np.testing.assert_allclose(cd.frames[TEXT_KEY][row], enc.embed([said[row]])[0].detach().numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="levels"):
        command_dataset(demos, enc, ["gesture"])
    # a level named twice is a second copy, each episode in the next paraphrase (a heavier share of batches)
    twice = command_dataset(demos, enc, ["task", "task"])
    again = [twice.tasks[int(twice.frames["task_index"][a])] for a in twice.episode_from]
    n = demos.num_episodes
    assert len(twice) == 2 * len(demos)
    assert again[n:n + 2] == [task_text(0, TRAIN_TEMPLATES[1]), task_text(0, TRAIN_TEMPLATES[2])]


def test_reasoner_steers_the_expert_to_success():
    """Executing the scripted reasoner's plan with the robot's own servo (each motion split evenly over
    its steps) finishes tasks the reasoner was never given examples of: the plan, not a policy, works."""
    class FollowPlan:
        def __init__(self):
            self.reasoner, self.queue = ScriptedReasoner("motion"), []

        def reset(self, seed=None):
            self.queue = []

        def __call__(self, obs):
            if not self.queue:
                move = parse_motion(self.reasoner(obs["state"], int(obs["task"][0])))
                self.queue = [move / MOTION_STEPS * 1.25] * MOTION_STEPS  # the servo lags a target by ~20%
            return np.clip(self.queue.pop(0), -0.05, 0.05).astype(np.float32)

    eps = rollout(FollowPlan(), "labkit/Tabletop-v0", range(1000, 1012), {"instruction": "text"})
    assert np.mean([e.success for e in eps]) >= 0.5


def test_runtime_logs_and_checks(demos):
    enc = VocabEncoder(list(TASKS) + ["move cm left right up down hold still"] + [str(i) for i in range(11)],
                       width=8, unknown="unk")
    cd = command_dataset(demos, enc, ["motion"])
    policy = BCPolicy.from_dataset(cd, obs_keys=("observation.state", TEXT_KEY), horizon=8, n_action_steps=MOTION_STEPS)
    rt = LanguageRuntime(policy, enc, lambda state, task: "move 3 cm right")
    eps = rollout(rt, "labkit/Tabletop-v0", [1000, 1001], {"instruction": "text"}, keep=("obs",), num_envs=2)
    assert len(rt.logs) == 2 and rt.logs[0][:2] == [(0, "move 3 cm right"), (MOTION_STEPS, "move 3 cm right")]
    commanded, executed = controllability(eps, rt.logs)
    assert len(commanded) >= 2 and executed.shape == commanded.shape
    np.testing.assert_allclose(commanded, np.tile([3.0, 0.0], (len(commanded), 1)))  # "move 3 cm right", in cm
    np.testing.assert_allclose(executed[0], (eps[0].obs["state"][MOTION_STEPS, :2] - eps[0].obs["state"][0, :2]) * 100)
    with pytest.raises(ValueError, match="wide"):
        LanguageRuntime(policy, VocabEncoder(["a b"], width=4), lambda s, t: "a")
    with pytest.raises(ValueError, match="observation.text"):
        LanguageRuntime(BCPolicy.from_dataset(demos, obs_keys=("observation.state",)), enc, lambda s, t: "a")
    with pytest.raises(KeyError, match="instruction='text'"):
        rt.reset()
        rt.select_action({"state": np.zeros(10, np.float32)})


def test_held_out_templates_are_not_training_words():
    assert not set(HELD_OUT_TEMPLATES) & set(TRAIN_TEMPLATES)
    assert torch.is_tensor(torch.zeros(1))


def test_learned_reasoner_learns_the_motions_and_round_trips(demos, tmp_path):
    enc = VocabEncoder(list(TASKS), width=8)
    labels = np.concatenate([[parse_motion(m) for m in label_episode(demos.frames["observation.state"][a:b], t)["motion"]]
                             for a, b, t in zip(demos.episode_from, demos.episode_to, episode_tasks(demos), strict=True)])
    zero_loss = float((labels ** 2).sum(-1).mean() * 1e4)  # cm^2 of saying "hold still" everywhere
    reasoner = LearnedReasoner(enc, hidden=64, layers=2).fit(demos, steps=400, schedule="cosine")
    assert reasoner.final_loss < 0.5 * zero_loss, (reasoner.final_loss, zero_loss)
    state = demos.frames["observation.state"][5]
    said = reasoner.say(state, 0)
    parse_motion(said)  # a motion command
    reasoner.save(tmp_path / "r.pt")
    again = LearnedReasoner.load(tmp_path / "r.pt", enc)
    assert again.sizes == reasoner.sizes and again.say(state, 0) == said
    with pytest.raises(ValueError, match="wide"):
        LearnedReasoner.load(tmp_path / "r.pt", VocabEncoder(list(TASKS), width=4))
    (tmp_path / "bad.pt").write_bytes((tmp_path / "r.pt").read_bytes()[:100])
    with pytest.raises(ValueError, match="bad.pt is not a LearnedReasoner checkpoint"):
        LearnedReasoner.load(tmp_path / "bad.pt", enc)
    with pytest.raises(FileNotFoundError, match="no reasoner checkpoint"):
        LearnedReasoner.load(tmp_path / "none.pt", enc)


def test_expert_action_labels_from_the_observation_as_the_expert_acts(demos):
    """DAgger's labeller reads only the observed state and gives the expert's own action (its rule, noise-free)."""
    from labkit.envs.tabletop import TabletopExpert
    from labkit.language.commands import expert_action

    env = gym.make("labkit/Tabletop-v0", instruction="text", task=5)
    obs, _ = env.reset(seed=1000)
    expert = TabletopExpert(env, noise=0.0)
    for _ in range(30):
        a = expert(obs)
        np.testing.assert_allclose(expert_action(obs["state"], 5), a, atol=1e-6)
        obs = env.step(a)[0]


def test_join_commands_keeps_both_datasets_commands(demos):
    from labkit.language.steer import join_commands

    enc = VocabEncoder(list(TASKS) + ["get behind the block facing corner push into"], width=8, unknown="unk")
    a, b = command_dataset(demos, enc, ["task"]), command_dataset(demos.select([0]), enc, ["subtask"])
    both = join_commands(a, b)
    assert both.num_episodes == a.num_episodes + 1 and len(both) == len(a) + len(b)
    said = [both.tasks[int(i)] for i in both.frames["task_index"]]
    assert said[:len(a)] == [a.tasks[int(i)] for i in a.frames["task_index"]]
    assert said[len(a):] == [b.tasks[int(i)] for i in b.frames["task_index"]]
    np.testing.assert_array_equal(both.frames[TEXT_KEY][len(a):], b.frames[TEXT_KEY])


def test_pretrained_build_runs_every_stage_and_records_it(tmp_path, monkeypatch):
    """`python -m labkit.language.pretrained` in miniature: every stage runs, meta.json records each, the
    motion stage's lower rate is not left in the saved policy, and one part rebuilds alone."""
    from labkit.language import pretrained

    monkeypatch.setitem(pretrained.RECIPE, "dagger", {**pretrained.RECIPE["dagger"], "rounds": 1, "episodes_per_task": 4,
                                                      "steps": 3})
    monkeypatch.setitem(pretrained.RECIPE, "polish", {**pretrained.RECIPE["polish"], "steps": 3})
    monkeypatch.setitem(pretrained.RECIPE, "reasoner", {**pretrained.RECIPE["reasoner"], "steps": 3})
    out = pretrained.build(episodes_per_task=1, steps=3, out=tmp_path / "flow.pt", progress=False)
    info = pretrained.meta(out)
    assert {"dagger", "polish", "reasoner"} <= set(info) and info["steps"] == 3 and info["episodes_per_task"] == 1
    assert len(info["dagger"]["rollout_success"]) == 1 and info["polish"]["lr"] == pretrained.RECIPE["polish"]["lr"]
    policy = pretrained.load_pretrained(out)
    assert policy.config.lr == 1e-3  # the policy's own rate, not the polish stage's
    before = {k: v.detach().clone() for k, v in policy.named_parameters()}
    pretrained.build(episodes_per_task=1, out=out, progress=False, parts=("polish",))
    after = dict(pretrained.load_pretrained(out).named_parameters())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # finetuned in place
    assert pretrained.meta(out)["steps"] == 3  # the base stage's record is kept
