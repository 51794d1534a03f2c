"""The agent contract and its one driver (labkit.rl.agent), on a stand-in agent with known numbers."""

from types import SimpleNamespace

import numpy as np
import pytest

from labkit.rl.agent import Agent, train


class Counting(Agent):
    """Each step takes 3 env steps, reports loss = the step's index, and ends an episode every 2nd step."""

    name = "counting"

    def __init__(self):
        self.env_id, self.env_kwargs, self.env_steps, self.steps, self.evaluated = "none", {}, 0, 0, []

    def step(self):
        self.steps += 1
        self.env_steps += 3
        ended = [(float(self.steps), self.steps % 4 == 0)] if self.steps % 2 == 0 else []
        return {"loss": float(self.steps), "ended": ended}

    def counters(self):
        return {"env_steps": self.env_steps, "steps_done": self.steps}

    def eval_policy(self):
        return None

    def evaluate(self, episodes=50, seed=0, progress=False):  # a stand-in for labkit.eval.evaluate
        self.evaluated.append(self.env_steps)
        return SimpleNamespace(success_rate=self.env_steps / 100, returns=np.array([1.0]))

    def training_state(self):
        return {"steps": self.steps, "env_steps": self.env_steps}

    def load_training_state(self, state):
        self.steps, self.env_steps = state["steps"], state["env_steps"]


def test_the_driver_counts_in_the_budgets_unit_and_averages_since_the_last_row():
    agent = Counting()
    history = train(agent, env_steps=12, eval_every=6, progress=False)
    # Evaluated before the first step, after every 6 env steps (2 agent steps), and at the end.
    assert agent.evaluated == [0, 6, 12] and [h["env_steps"] for h in history] == [0, 6, 12]
    assert history[1]["loss"] == 1.5 and history[2]["loss"] == 3.5  # mean of the steps since the last row
    assert history[1]["train_return"] == 2.0 and history[1]["train_success"] == 0.0  # step 2's episode
    assert history[2]["train_success"] == 1.0 and history[2]["success"] == 0.12
    rows = train(Counting(), steps=3, progress=False)  # no eval_every: a row per step, nothing evaluated
    assert [r["steps_done"] for r in rows] == [1, 2, 3] and "success" not in rows[0]
    assert np.isnan(rows[0]["train_return"]) and rows[1]["train_return"] == 2.0
    rows = train(Counting(), steps=6, log_every=4, progress=False)  # a row every 4 steps, and at the end
    assert [r["steps_done"] for r in rows] == [4, 6]


def test_the_driver_names_bad_budgets():
    with pytest.raises(ValueError, match="exactly one budget"):
        train(Counting(), progress=False)
    with pytest.raises(ValueError, match="exactly one budget"):
        train(Counting(), env_steps=3, steps=3, progress=False)
    with pytest.raises(ValueError, match="eval_every must be >= 1"):
        train(Counting(), steps=3, eval_every=0, progress=False)
    with pytest.raises(ValueError, match="budget must be >= 1"):
        Counting().train(0, progress=False)


def test_methods_register_by_name():
    import labkit.rl  # noqa: F401  (defines every method)

    assert {"dsrl", "residual", "expo", "dppo", "recap"} <= set(Agent.registry)
    assert "counting" not in Agent.registry  # no `method`: a helper class, not a method
    assert Agent.registry["residual"].takes_demos and not Agent.registry["dppo"].takes_demos
