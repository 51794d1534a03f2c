"""Wilson intervals against known values, and evaluate() on the scripted expert."""

import numpy as np
import pytest

from labkit.eval import evaluate, wilson_interval


def test_wilson_interval_known_values():
    # Reference values from the closed form (Wilson 1927), z = 1.96.
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-3)
    lo, hi = wilson_interval(100, 100)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.9630, abs=1e-3)
    with pytest.raises(ValueError):
        wilson_interval(3, 0)
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_evaluate_expert_on_detour():
    res = evaluate("expert", "labkit/Detour-v0", episodes=12, seed=0, num_envs=4, videos=1, progress=False)
    assert res.episodes == 12 and res.success.shape == (12,)
    assert res.success_rate == 1.0
    assert res.mean_info("collision") == 0.0
    assert len(res.videos) == 1 and res.videos[0].ndim == 4 and res.videos[0].shape[0] == res.lengths[0] + 1
    assert "12 episodes" in res.summary()


def test_evaluate_plain_callable_and_seeding():
    straight = lambda obs: np.array([0.0, 0.5], np.float32)  # drives into the wall
    a = evaluate(straight, "labkit/Detour-v0", episodes=5, seed=7, progress=False)
    b = evaluate(straight, "labkit/Detour-v0", episodes=5, seed=7, progress=False)
    assert a.success_rate == 0.0 and a.mean_info("collision") == 1.0
    np.testing.assert_array_equal(a.lengths, b.lengths)


def test_rollout_states_follow_the_policy_and_seed():
    from labkit.eval import rollout_states

    class StraightUp:  # a stand-in with the Policy runtime contract: drives straight into the wall
        def reset(self):
            pass

        def select_action(self, obs):
            return np.array([0.0, 0.5], dtype=np.float32)

    a = rollout_states(StraightUp(), "labkit/Detour-v0", episodes=2, seed=5)
    b = rollout_states(StraightUp(), "labkit/Detour-v0", episodes=2, seed=5)
    assert len(a) == 2 and a[0].shape[1] == 6
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0][-1, 1] > a[0][0, 1]  # it moved up
