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

        def select_action(self, obs):  # a batch of observations -> a batch of actions
            return np.tile(np.array([0.0, 0.5], dtype=np.float32), (len(obs["state"]), 1))

    a = rollout_states(StraightUp(), "labkit/Detour-v0", episodes=2, seed=5)
    b = rollout_states(StraightUp(), "labkit/Detour-v0", episodes=2, seed=5)
    assert len(a) == 2 and a[0].shape[1] == 6
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0][-1, 1] > a[0][0, 1]  # it moved up


def test_ranking_metrics_by_hand():
    from labkit.eval import mmrv, pearson, spearman

    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # x = (0, 1, 2), y = (0, 2, 1): cov = 0.5 * 2 / ... by hand r = 0.5
    assert pearson([0, 1, 2], [0, 2, 1]) == pytest.approx(0.5)
    assert spearman([1, 2, 3], [10, 50, 40]) == pytest.approx(0.5)  # ranks (0,1,2) vs (0,2,1)
    assert spearman([1, 2, 3], [1, 4, 9]) == pytest.approx(1.0)  # monotone, not linear
    # One inverted pair (0.5 vs 0.9, gap 0.4): policies 1 and 2 each carry 0.4, policy 0 none.
    assert mmrv([0.1, 0.5, 0.9], [0.2, 0.6, 0.5]) == pytest.approx(0.8 / 3)
    assert mmrv([0.1, 0.5, 0.9], [1, 2, 3]) == 0.0
    # Fully reversed: each policy's worst violation is its largest gap.
    assert mmrv([0.0, 0.5, 1.0], [3, 2, 1]) == pytest.approx((1.0 + 0.5 + 1.0) / 3)
    with pytest.raises(ValueError, match="equally long"):
        pearson([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="finite"):
        mmrv([0.1, float("nan")], [1, 2])


def _block_frame_flow():
    """An untrained flow policy built from the block-frame PushT data: it remembers that env interface."""
    import torch

    from labkit.data import DATASETS, load_dataset
    from labkit.policies import FlowPolicy

    torch.manual_seed(0)
    ds = load_dataset(DATASETS / "pusht_block_rel").select([0, 1])
    return FlowPolicy.from_dataset(ds, horizon=4, n_action_steps=2, hidden=32, layers=2, steps=2)


def test_the_env_interface_check_fires_through_rl_runtimes():
    # A wrapper around a base policy (DSRL's steered policy, best-of-N, the residual's base runtime) is
    # rolled out in its base's interface: asking for another frame is a named error, not a silent ~0%.
    from labkit.rl.actor import TanhGaussianActor
    from labkit.rl.critics import QEnsemble
    from labkit.rl.dsrl import SteeredPolicy
    from labkit.rl.residual import BaseRuntime

    policy = _block_frame_flow()
    x_dim = policy.config.obs_horizon * policy.shapes["observation.state"][0]
    wrappers = [SteeredPolicy(policy, TanhGaussianActor(x_dim, policy.config.horizon * policy.action_dim, (16,))),
                BaseRuntime(policy),
                __import__("labkit.rl.best_of_n", fromlist=["BestOfN"]).BestOfN(
                    policy, QEnsemble(x_dim, policy.config.n_action_steps * policy.action_dim, (16,)), n=2)]
    for runtime in wrappers:
        assert runtime.data_env == policy.data_env and policy.data_env["env_kwargs"]["frame"] == "block"
        with pytest.raises(ValueError, match="frame='block'.*frame='world'"):
            evaluate(runtime, "labkit/PushT-v0", episodes=1, env_kwargs={"frame": "world"}, progress=False)
    # Without a conflicting request the wrapper runs in the block frame with relative actions.
    result = evaluate(wrappers[1], "labkit/PushT-v0", episodes=1, progress=False)
    assert result.episodes == 1


def test_evaluate_is_seeded_and_leaves_the_callers_rng_alone():
    import torch

    from labkit.data import EVAL_SEED

    policy = _block_frame_flow()  # untrained: its actions are mostly its sampling noise
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = evaluate(policy, "labkit/PushT-v0", episodes=2, num_envs=2, progress=False)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's stream is untouched
    b = evaluate(policy, "labkit/PushT-v0", episodes=2, num_envs=2, seed=EVAL_SEED, progress=False)
    def coverage(r):
        return [i["coverage"] for i in r.final_info]

    assert coverage(a) == coverage(b)  # the default seeds are the evaluation seeds, and torch is seeded
    c = evaluate(policy, "labkit/PushT-v0", episodes=2, num_envs=2, seed=EVAL_SEED + 1, progress=False)
    assert coverage(c) != coverage(a)


def test_success_bars_draw_at_zero_and_full_success():
    """At 0% and 100% the Wilson bound may sit a rounding error past the rate: the plot must not refuse it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from labkit.eval import EvalResult
    from labkit.viz import success_bars

    def result(n_success, n):
        ok = np.arange(n) < n_success
        return EvalResult("x", n, ok, ok.astype(float), np.ones(n), [{}] * n)

    fig, ax = plt.subplots()
    success_bars({"all": result(106, 106), "none": result(0, 100), "some": result(30, 100)}, ax=ax)
    heights = [p.get_height() for p in ax.patches]
    plt.close(fig)
    assert heights == pytest.approx([1.0, 0.0, 0.3])
