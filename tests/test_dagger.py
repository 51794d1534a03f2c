"""labkit.policies.dagger: the aggregation arithmetic, label bookkeeping, the labeller check, the
compounding-error measure, and one small DAgger run on Detour."""

from __future__ import annotations

import numpy as np
import pytest

import labkit  # noqa: F401
from labkit.data.dataset import EpisodeDataset
from labkit.envs.detour import DetourExpert
from labkit.policies import BCPolicy
from labkit.policies.dagger import (
    ExpertCannotLabel,
    aggregate,
    check_labeller,
    collect,
    dagger,
    distance_to_demos,
    expert_demos,
    first_labels,
)

ENV = "labkit/Detour-v0"


def _ds(lengths, start=0.0):
    """Episodes with recognisable frames: state row t of episode e is [e, t, start], action [10e + t]."""
    eps = [{"observation.state": np.array([[e, t, start] for t in range(n)], np.float32),
            "action": np.array([[10 * e + t] for t in range(n)], np.float32)} for e, n in enumerate(lengths)]
    return EpisodeDataset.from_episodes(eps, fps=10)


def test_aggregate_keeps_old_frames_and_adds_the_experts_labels():
    old = _ds([3, 2])
    visited = [{"observation.state": np.full((4, 3), 7, np.float32), "action": np.zeros((4, 1), np.float32),
                "expert_action": np.arange(4, dtype=np.float32)[:, None] + 100, "success": False}]
    new = aggregate(old, visited)
    assert len(new) == 5 + 4 and new.num_episodes == 3
    np.testing.assert_array_equal(new.frames["action"][:5], old.frames["action"])  # earlier labels untouched
    np.testing.assert_array_equal(new.frames["observation.state"][:5], old.frames["observation.state"])
    np.testing.assert_array_equal(new.frames["action"][5:, 0], [100, 101, 102, 103])  # the expert's, not executed
    np.testing.assert_array_equal(new.frames["observation.state"][5:], visited[0]["observation.state"])
    np.testing.assert_array_equal(new.lengths, [3, 2, 4])


def test_first_labels_counts_exactly():
    demos = _ds([3, 4, 5])
    got = first_labels(demos, 9)  # 3 + 4 whole, then 2 of the third
    assert len(got) == 9 and got.num_episodes == 3
    np.testing.assert_array_equal(got.lengths, [3, 4, 2])
    np.testing.assert_array_equal(got.frames["action"][-2:, 0], [20, 21])
    assert first_labels(demos, 7).num_episodes == 2  # a whole-episode boundary needs no cut
    with pytest.raises(ValueError, match="labels"):
        first_labels(demos, 13)
    with pytest.raises(ValueError, match="labels"):
        first_labels(demos, 0)


def test_distance_to_demos_by_hand():
    demo = np.array([[0.0, 0.0], [1.0, 0.0]])
    paths = [np.array([[0.0, 1.0], [1.0, 2.0]]),  # distances 1, 2
             np.array([[0.5, 0.0], [3.0, 0.0], [4.0, 0.0]])]  # 0.5, 2, 3
    d = distance_to_demos(paths, demo)
    np.testing.assert_allclose(d, [(1 + 0.5) / 2, (2 + 2) / 2, (2 + 3) / 2])  # the short one holds its last state
    with pytest.raises(ValueError, match="shape"):
        distance_to_demos([np.zeros((3, 3))], demo)
    with pytest.raises(ValueError, match="at least one path"):
        distance_to_demos([], demo)


def test_check_labeller_refuses_an_expert_that_reads_its_env():
    check_labeller(labkit.envs.expert, ENV)  # Detour's expert reads only the observation
    with pytest.raises(ExpertCannotLabel, match="observation alone"):
        check_labeller(labkit.envs.expert, "labkit/PushT-v0")  # PushT's reads the block pose from the simulator
    with pytest.raises(ExpertCannotLabel, match="callable"):
        check_labeller(lambda env: 42, ENV)


class _Still:
    """A stand-in learner that commands zero velocity."""

    def reset(self):
        pass

    def select_action(self, obs):
        return np.zeros(2, np.float32)


def test_collect_labels_every_visited_state_with_the_expert():
    import gymnasium as gym

    env = gym.make(ENV)
    visited = collect(_Still(), labkit.envs.expert(env), ENV, [7, 8])
    for v, seed in zip(visited, [7, 8], strict=True):
        assert len(v["observation.state"]) == len(v["action"]) == len(v["expert_action"]) == 100  # never arrives
        assert np.all(v["action"] == 0)  # beta=0: the learner drove
        fresh = labkit.envs.expert(env)
        fresh.reset(seed=seed)  # the expert, asked afresh about the same states, says the same
        np.testing.assert_allclose(v["expert_action"], [fresh({"state": s}) for s in v["observation.state"]], atol=1e-6)
        assert np.abs(v["expert_action"]).max() > 0.3  # ... and it wanted to move


def test_dagger_rejects_bad_input():
    demos = _ds([3])
    make = lambda d: BCPolicy.from_dataset(d, horizon=1, n_action_steps=1)  # noqa: E731
    with pytest.raises(ValueError, match="rounds"):
        dagger(make, demos, ENV, rounds=0)
    with pytest.raises(ValueError, match="beta"):
        dagger(make, demos, ENV, beta=1.5)
    with pytest.raises(ExpertCannotLabel):
        dagger(make, demos, "labkit/PushT-v0")


class _Right(DetourExpert):
    """Detour's expert, always round the right side (one mode), its waypoint read off the position."""

    def reset(self, seed=None):
        super().reset(seed)
        self.side = 1.0

    def __call__(self, obs):
        x, y = obs["state"][:2]
        self.wp = 2 if y > 0.14 else 1 if x > 0.42 else 0
        return super().__call__(obs)


def test_dagger_round_labels_off_demonstration_states_and_counts_them():
    demos = expert_demos(ENV, 1, seed=0, expert=_Right)
    make = lambda d: BCPolicy.from_dataset(d, horizon=1, n_action_steps=1, hidden=64, layers=2)  # noqa: E731
    wrong = lambda data, visited: data  # noqa: E731  (forgets the visited states)
    with pytest.raises(ValueError, match="adds one per visited state"):
        dagger(make, demos, ENV, rounds=1, episodes=1, steps=20, expert=_Right, aggregate=wrong)
    policy, history, data = dagger(make, demos, ENV, rounds=1, episodes=3, steps=30, expert=_Right)
    assert [h["labels"] for h in history] == [len(demos), len(data)]
    assert history[1]["labels"] == len(demos) + history[1]["new_labels"]
    new = data.frames["observation.state"][len(demos):, :2]
    gap = distance_to_demos([new], demos.frames["observation.state"][:, :2])
    # A barely trained learner strays: DAgger labels states the single demonstration never visited.
    assert gap.max() > 0.1, gap.max()
    bc = first_labels(expert_demos(ENV, 30, seed=0, expert=_Right), len(data))
    assert len(bc) == len(data)


def test_pursuit_expert_labels_from_the_observation_and_goes_round_its_side():
    from labkit.envs.detour import PursuitExpert
    from labkit.eval import evaluate, rollout_states

    check_labeller(PursuitExpert, ENV)  # a continuous function of the observation: it may label any state
    for side in (1.0, -1.0):
        expert = PursuitExpert(side=side)
        assert evaluate(expert, ENV, episodes=10, progress=False).success_rate == 1.0
        paths = rollout_states(expert, ENV, 5)
        beside_wall = np.concatenate([p[np.abs(p[:, 1]) < 0.1, 0] for p in paths])  # x while level with the wall
        assert len(beside_wall) and np.all(np.sign(beside_wall) == side)
    with pytest.raises(ValueError, match="side"):
        PursuitExpert(side=0.5)


def test_equal_labels_gives_bc_exactly_daggers_label_count_and_names_the_verdict():
    from labkit.policies.dagger import equal_labels

    demos = expert_demos(ENV, 20, seed=0, expert=_Right)
    make = lambda d: BCPolicy.from_dataset(d, horizon=1, n_action_steps=1, hidden=32, layers=1)  # noqa: E731
    run = equal_labels(make, demos, ENV, start_demos=1, rounds=1, episodes=2, steps=20, expert=_Right, eval_episodes=4)
    assert run["bc_labels"] == run["labels"] == run["history"][-1]["labels"] > len(demos.select([0]))
    (d_lo, d_hi), (b_lo, b_hi) = run["results"]["DAgger"].interval, run["results"]["BC"].interval
    expected = "DAgger ahead" if d_lo > b_hi else "BC ahead" if b_lo > d_hi else "no clear winner: the intervals overlap"
    assert run["verdict"] == expected and run["results"]["BC"].episodes == 4
