"""The Cosmos-style joint model (labkit.world_models.joint): rows labelled by hand, planning by own value."""

import numpy as np
import pytest
import torch

import labkit  # noqa: F401  (registers the tasks, picks the GL backend)
from labkit.eval import evaluate
from labkit.policies import FlowPolicy, fit
from labkit.world_models.joint import JointPlanner, inpainted_values, joint_dataset

TINY = dict(horizon=4, n_action_steps=2, obs_horizon=2, hidden=32, layers=1, steps=3)


def test_rows_by_hand():
    s = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 2.0]], np.float32)  # T + 1 states
    a = np.array([[0.5], [0.25]], np.float32)
    d = joint_dataset([{"state": s, "action": a, "success": True},
                       {"state": s[:2], "action": a, "success": False}], gamma=0.5)
    rows = d.frames["action"]
    # episode 0: [a, s' - s, 0.5 ** (T - j)] with j = t + 1 and T = 2
    np.testing.assert_allclose(rows[:2], [[0.5, 1, 0, 0.5], [0.25, 0, 2, 1.0]])
    # episode 1 records no state after its last action (state change 0) and failed (value 0)
    np.testing.assert_allclose(rows[2:], [[0.5, 1, 0, 0], [0.25, 0, 0, 0]])
    np.testing.assert_allclose(d.frames["observation.state"], np.concatenate([s[:2], s[:2]]))
    with pytest.raises(ValueError, match="3 states for 1 actions"):
        joint_dataset([{"state": s, "action": a[:1], "success": True}])


class _Fixed(FlowPolicy):
    """Samples handed in by the test: candidate i has value i at every row, and action i."""

    def sample(self, obs, steps=None, stochastic=False, use_ema=None, **kw):
        n = len(next(iter(obs.values())))
        rows = torch.zeros(n, self.config.horizon, self.action_dim)
        order = torch.tensor([3.0, 0.0, 7.0, 1.0]).repeat(n // 4 + 1)[:n]
        rows[:, :, 0] = order[:, None]
        rows[:, :, -1] = order[:, None]
        from labkit.policies.generative import SampleResult
        return SampleResult(self.normalizer.normalize("action", rows), rows[:, None])


def _joint_data():
    rng = np.random.default_rng(0)
    eps = [{"state": rng.normal(size=(9, 2)).astype(np.float32), "action": rng.normal(size=(8, 1)).astype(np.float32),
            "success": bool(i % 2)} for i in range(6)]
    return joint_dataset(eps)


def test_the_planner_keeps_the_candidate_with_the_highest_own_value():
    data = _joint_data()
    policy = _Fixed.from_dataset(data, env={}, **TINY)
    planner = JointPlanner(policy, action_dim=1, n=4)
    hist = {"observation.state": torch.zeros(2, 2, 2)}
    chunk = planner.predict_action_chunk(hist)
    assert chunk.shape == (2, 4, 1)  # actions only
    torch.testing.assert_close(chunk, torch.full((2, 4, 1), 7.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(planner.last_values, torch.tensor([[3.0, 0.0, 7.0, 1.0]] * 2), atol=1e-4, rtol=0)
    # n = 1 takes the one sample, whatever its value (the stub hands rows 3 and 0 to the two observations)
    one = JointPlanner(policy, 1, n=1).predict_action_chunk(hist)
    torch.testing.assert_close(one[:, 0, 0], torch.tensor([3.0, 0.0]), atol=1e-4, rtol=0)


def test_bad_widths_are_named():
    policy = FlowPolicy.from_dataset(_joint_data(), env={}, **TINY)
    with pytest.raises(ValueError, match="joint_dataset"):
        JointPlanner(policy, action_dim=2)
    with pytest.raises(ValueError, match="n must be"):
        JointPlanner(policy, action_dim=1, n=0)
    with pytest.raises(ValueError, match="'inpainted'"):
        JointPlanner(policy, action_dim=1, value="mean")


class _ValueFromAction(torch.nn.Module):
    """A velocity that moves only the value column, at twice the action column's current value (row by row)."""

    def forward(self, x, t, feat):
        v = torch.zeros_like(x)
        v[..., -1] = 2 * x[..., 0]
        return v


def test_inpainted_values_hold_the_actions_on_their_path_and_average_the_draws():
    policy = FlowPolicy.from_dataset(_joint_data(), env={}, **TINY).eval()
    policy.net(None)["denoiser"] = _ValueFromAction()
    a = torch.tensor([[-1.0, 0.5, 2.0]])  # three candidates for one observation, normalised, constant over rows
    chunks = torch.zeros(1, 3, TINY["horizon"], policy.action_dim)
    chunks[..., 0] = a[..., None]
    obs = {"observation.state": torch.zeros(1, 2, 2)}
    torch.manual_seed(0)
    got = inpainted_values(policy, obs, chunks, action_dim=1, k=20_000, steps=2)
    # Two Euler steps: V_1 = z_V + 2 dt [z_a + (0.5 z_a + 0.5 a)] = z_V + 1.5 z_a + 0.5 a, so E[V | a] = 0.5 a
    # (normalised); a sampled-value planner would see z_V + 1.5 z_a + 0.5 a, mostly noise.
    rows = torch.zeros(3, policy.action_dim)
    rows[:, -1] = 0.5 * a[0]
    want = policy.normalizer.unnormalize("action", rows)[:, -1]
    torch.testing.assert_close(got[0], want, atol=0.05 * want.abs().max().item() + 0.05, rtol=0)
    assert got[0].argmax() == 2
    # A hold that forgets the candidate (the student's possible slip) leaves every value at E[V] = 0 (normalised)
    torch.manual_seed(0)
    blind = inpainted_values(policy, obs, chunks, action_dim=1, k=20_000, steps=2, hold_fn=lambda x, z, known, t, a: x)
    zero = policy.normalizer.unnormalize("action", torch.zeros(1, policy.action_dim))[0, -1]
    torch.testing.assert_close(blind[0], zero.expand(3), atol=0.05 * want.abs().max().item() + 0.05, rtol=0)
    with pytest.raises(ValueError, match="k must be"):
        inpainted_values(policy, obs, chunks, action_dim=1, k=0)


def test_it_trains_and_runs_on_detour():
    import labkit.world_models as W
    from labkit.data import DATASETS, load_dataset

    demos = W.episodes_from_dataset(load_dataset(DATASETS / "detour").select(range(6)))
    data = joint_dataset(demos)
    torch.manual_seed(0)
    policy = fit(FlowPolicy.from_dataset(data, env={}, **TINY), data, steps=20, batch_size=32, progress=False)
    r = evaluate(JointPlanner(policy, 2, n=4, env={"env_id": "labkit/Detour-v0", "env_kwargs": {}}),
                 "labkit/Detour-v0", episodes=2, progress=False)
    assert r.episodes == 2


def test_the_study_refuses_bad_budgets_by_name(capsys):
    from labkit.world_models import joint_study

    for flag in ("--k", "--n", "--steps", "--episodes", "--finetune"):
        with pytest.raises(SystemExit):
            joint_study.main([flag, "0"])
        assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err


def test_a_planning_model_scores_the_policys_candidates(monkeypatch):
    import labkit.world_models.joint as J

    data = _joint_data()
    policy, planning = _Fixed.from_dataset(data, env={}, **TINY), FlowPolicy.from_dataset(data, env={}, **TINY)
    seen = {}

    def fake_values(model, obs, chunks, action_dim, k, hold_fn):  # prefers the candidate whose action is 0
        seen["model"], seen["k"] = model, k
        actions = model.normalizer.unnormalize("action", chunks)[..., 0, 0]
        return -actions.abs()

    monkeypatch.setattr(J, "inpainted_values", fake_values)
    chunk = JointPlanner(policy, 1, n=4, k=3, planning=planning).predict_action_chunk(
        {"observation.state": torch.zeros(2, 2, 2)})
    assert seen["model"] is planning and seen["k"] == 3
    torch.testing.assert_close(chunk, torch.zeros(2, 4, 1), atol=1e-4, rtol=0)  # not the own-value argmax (7)


def test_hold_known_by_hand():
    from labkit.world_models.joint import hold_known

    x, z, known = torch.zeros(1, 2, 3), torch.ones(1, 2, 1), torch.full((1, 2, 1), 3.0)
    out = hold_known(x, z, known, 0.25, 1)
    torch.testing.assert_close(out[..., 0], torch.full((1, 2), 0.75 * 1 + 0.25 * 3))
    torch.testing.assert_close(out[..., 1:], torch.zeros(1, 2, 2))
    assert x.abs().sum() == 0, "hold_known must not write into its input"
