"""labkit.world_models: the ensemble's loss and training, imagination, weighting, planning, pixel model."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import labkit  # noqa: F401
import labkit.world_models as W
from labkit.data import DATASETS, load_dataset
from labkit.eval import evaluate
from labkit.world_models.planning import BestOfNPlanner, CEMPlanner, ValueFunction, score_chunks

ENV = "labkit/Detour-v0"


@pytest.fixture(scope="module")
def demos():
    return load_dataset(DATASETS / "detour")


@pytest.fixture(scope="module")
def trained(demos):
    eps = W.episodes_from_dataset(demos)
    val = W.transitions_from_episodes(eps[180:])
    wm = W.StateWorldModel(6, 2, ensemble=3, hidden=128).fit(W.transitions_from_episodes(eps[:180]), steps=800,
                                                           val=val, log_every=50)
    return wm, eps, val


def test_gaussian_nll_by_hand():
    mean, logvar, target = torch.tensor([1.0, 0.0]), torch.tensor([0.0, np.log(4.0)]), torch.tensor([2.0, 2.0])
    # ((1-2)^2 * 1 + 0 + (0-2)^2 / 4 + log 4) / 2
    assert W.gaussian_nll(mean, logvar, target).item() == pytest.approx((1 + 1 + np.log(4)) / 2, rel=1e-6)


def test_fit_trains_with_a_handed_in_training_step(demos):
    """`StateWorldModel(training_step=fn)`: every fit of the model (and of its copies) trains with what a
    lesson hands in; the default is unchanged."""
    import copy

    data = W.transitions_from_episodes(W.episodes_from_dataset(demos)[:20])

    def no_events(wm, batch):  # a plausible wrong answer: the event heads left out of the loss
        mean, logvar, _ = wm(batch["state"], batch["action"])
        target = (batch["next_state"] - batch["state"] - wm.mean_d) / wm.std_d
        has = batch["has_next"].bool()
        return W.gaussian_nll(mean[has], logvar[has], target[has])

    def run(step):
        torch.manual_seed(0)
        wm = W.StateWorldModel(6, 2, ensemble=2, hidden=32, layers=2, training_step=step).fit(data, steps=15)
        again = copy.deepcopy(wm).fit(data, steps=5, seed=1)  # a refined copy keeps the step
        return [torch.nn.utils.parameters_to_vector(m.parameters()).detach() for m in (wm, again)]

    default = run(None)
    same = run(lambda wm, batch: wm.batch_loss(batch))
    assert all(torch.equal(a, b) for a, b in zip(default, same, strict=True))  # bit-identical
    wrong = run(no_events)
    assert not any(torch.allclose(a, b) for a, b in zip(default, wrong, strict=True))
    with pytest.raises(TypeError, match="training_step must be a function"):
        W.StateWorldModel(6, 2, training_step="nll")


def test_transitions_mark_missing_next_state_and_events():
    eps = [{"state": np.zeros((3, 2)), "action": np.ones((3, 1)), "success": True, "failure": False},
           {"state": np.arange(8.0).reshape(4, 2), "action": np.ones((3, 1)), "success": False, "failure": True}]
    t = W.transitions_from_episodes(eps)
    assert t["has_next"].tolist() == [True, True, False, True, True, True]
    assert t["events"].tolist() == [[0, 0], [0, 0], [1, 0], [0, 0], [0, 0], [0, 1]]
    assert t["next_state"][5].tolist() == [6.0, 7.0]
    with pytest.raises(ValueError, match="states for"):
        W.transitions_from_episodes([{"state": np.zeros((5, 2)), "action": np.zeros((3, 1))}])


def test_one_step_error_falls_and_beats_constant_velocity(trained):
    wm, _, val = trained
    errors = [h["val_error"] for h in wm.history]
    assert errors[-1] < 0.3 * errors[0]
    # a useful model beats "the state does not change" on held-out demos
    has = val["has_next"]
    still = np.sqrt(((val["next_state"][has] - val["state"][has]) ** 2).mean())
    assert errors[-1] < 0.5 * still


def test_predict_shapes_and_member_choice(trained):
    wm = trained[0]
    s, a = torch.zeros(4, 6), torch.zeros(4, 2)
    nxt, p = wm.predict(s, a, member=torch.tensor([0, 1, 2, 0]), sample=False)
    assert nxt.shape == (4, 6) and p.shape == (4, 2) and ((p >= 0) & (p <= 1)).all()
    assert torch.allclose(nxt[0], nxt[3])  # same member, no sampling: same prediction


def test_imagined_states_stay_near_the_data(trained):
    # Far outside the training states the model's output means nothing and compounds (a FAST lesson 07
    # rollout reached |s| ~ 5e5 and trained a NaN policy): predictions are kept in the widened data box.
    wm, _, val = trained
    far = torch.full((3, 6), 50.0)
    nxt, _ = wm.predict(far, torch.ones(3, 2) * 10, sample=False)
    assert (nxt <= wm.high_s).all() and (nxt >= wm.low_s).all()
    states = torch.as_tensor(val["state"])
    assert (states >= wm.low_s).all() and (states <= wm.high_s).all()  # held-out real states lie inside
    assert (wm.high_s - wm.low_s).max() < 10  # the box is the data's, not unbounded


def test_failures_teach_the_failure_head(trained):
    wm, eps, _ = trained
    crash = {"state": np.array([[0.0, -0.3, 0, 0.4, 0, 0.7], [0.0, -0.25, 0, 0.5, 0, 0.7], [0.0, -0.2, 0, 0.5, 0, 0.7],
                                [0.0, -0.15, 0, 0.5, 0, 0.7], [0.0, -0.1, 0, 0.0, 0, 0.7]], np.float32),
             "action": np.tile([[0.0, 0.5]], (4, 1)).astype(np.float32), "success": False, "failure": True}
    near = torch.tensor([[0.0, -0.15, 0, 0.5, 0, 0.7]]), torch.tensor([[0.0, 0.5]])
    before = wm(*near)[2].sigmoid().mean(0)[0, 1].item()
    import copy
    refined = copy.deepcopy(wm).fit(W.transitions_from_episodes(eps[:40] + [crash] * 40), steps=200, seed=1)
    after = refined(*near)[2].sigmoid().mean(0)[0, 1].item()
    assert before < 0.1 and after > 0.5


def test_imagined_env_contract_and_same_starts(trained):
    wm = trained[0]
    env = gym.make(W.ID, world_model=wm, task=ENV, horizon=5)
    real = gym.make(ENV)
    obs, _ = env.reset(seed=7)
    assert np.allclose(obs["state"], real.reset(seed=7)[0]["state"])
    steps, done = 0, False
    while not done:
        obs, r, term, trunc, info = env.step(env.action_space.sample())
        steps, done = steps + 1, term or trunc
        assert env.observation_space.contains(obs) and {"is_success", "collision"} <= set(info)
    assert steps <= 5
    with pytest.raises(ValueError, match="member"):
        W.ImaginedEnv(wm, ENV, member="sometimes")


def test_imagine_batched_and_evaluate_in_imagination(trained, demos):
    from labkit.policies import BCPolicy, fit
    wm = trained[0]
    pol = fit(BCPolicy.from_dataset(demos.select(range(20))), demos.select(range(20)), steps=5, progress=False)
    eps = W.imagine(pol, wm, W.start_states(ENV, 4, seed=0), horizon=12)
    assert len(eps) == 4 and all(len(e["state"]) == len(e["action"]) + 1 <= 13 for e in eps)
    res = evaluate(pol, W.ID, episodes=3, seed=0, env_kwargs={"world_model": wm, "task": ENV, "horizon": 12},
                   progress=False)
    assert res.episodes == 3 and res.lengths.max() <= 12


def test_weights_and_resample():
    eps = [{"success": s, "p_success": np.array([p])} for s, p in [(True, 0.9), (False, 0.2), (True, 1.0)]]
    assert W.weights(eps).tolist() == [1.0, 0.0, 1.0]
    assert np.allclose(W.weights(eps, "exp", beta=0.5), [1.0, np.exp(-2.0), 1.0])
    picked = W.resample(eps, W.weights(eps), n=50, seed=0)
    assert len(picked) == 50 and all(e["success"] for e in picked)
    assert W.resample(eps, np.zeros(3)) == []


def test_dataset_from_episodes_trains(demos):
    eps = W.episodes_from_dataset(demos.select(range(3)))
    ds = W.dataset_from_episodes(eps, demos)
    assert ds.num_episodes == 3 and len(ds) == sum(len(e["action"]) for e in eps)
    for i, e in enumerate(eps):
        np.testing.assert_array_equal(ds.episode(i)["observation.state"], e["state"][: len(e["action"])])
        np.testing.assert_array_equal(ds.episode(i)["frame_index"], np.arange(len(e["action"])))
    assert ds.stats is demos.stats and ds.episodes["success"].tolist() == [e["success"] for e in eps]
    w = ds.windows(2, 16)
    assert w["action"].shape == (len(ds), 16, 2)


def test_score_chunks_prefers_predicted_success(trained):
    class Oracle:  # success iff the action's x > 0: scoring must pick those chunks
        config = type("C", (), {"ensemble": 2})()

        def predict_members(self, s, a):
            return s, torch.stack([(a[..., 0] > 0).float(), (a[..., 0] <= 0).float()], -1)

    chunks = torch.tensor([[-0.3, 0.0], [0.3, 0.0], [-0.1, 0.1]]).view(1, 3, 1, 2).repeat(1, 1, 2, 1)
    scores = score_chunks(Oracle(), None, torch.zeros(1, 6), chunks)
    assert scores.argmax().item() == 1 and scores[0, 1].item() == pytest.approx(1.0)


def test_planners_run_in_evaluate(trained, demos):
    from labkit.policies import FlowPolicy, fit
    wm, eps, _ = trained
    pol = fit(FlowPolicy.from_dataset(demos), demos, steps=5, progress=False)
    value = ValueFunction(6).fit(eps[:20], steps=20)
    for planner in (BestOfNPlanner(pol, wm, value, n=4), CEMPlanner(pol, wm, value, n=6, iterations=1, elites=2)):
        res = evaluate(planner, ENV, episodes=2, seed=0, progress=False)
        assert res.episodes == 2 and planner.last_scores.shape[1] in (4, 6)


def test_pixel_world_model_learns():
    from labkit.world_models.pixel import PixelWorldModel, render_episodes
    frames, actions = render_episodes(ENV, 3, max_steps=8)
    assert frames.shape == (3, 9, 64, 64, 3) and actions.shape == (3, 8, 2)
    torch.manual_seed(0)
    wm = PixelWorldModel(channels=8, latent=16).fit(frames, actions, steps=60, window=2, batch_size=8, log_every=10)
    assert wm.history[-1]["recon"] < 0.5 * wm.history[0]["recon"]
    video = wm.imagine(frames[0, 0], actions[0])
    assert video.shape == (9, 64, 64, 3) and video.dtype == np.uint8


def test_pixel_fit_trains_with_a_handed_in_recon_loss():
    from labkit.world_models.pixel import PixelPredictor, pixel_loss
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (2, 4, 64, 64, 3), dtype=np.uint8)
    actions = rng.normal(size=(2, 3, 2)).astype(np.float32)

    def run(recon_loss):
        torch.manual_seed(0)
        wm = PixelPredictor(channels=4).fit(frames, actions, steps=3, window=2, batch_size=2, recon_loss=recon_loss)
        return torch.nn.utils.parameters_to_vector(wm.parameters()).detach()

    default = run(None)
    assert torch.equal(default, run(lambda p, x, bg: pixel_loss(p, x, bg)))
    assert not torch.allclose(default, run(lambda p, x, bg: (p - x).pow(2).mean()))  # unweighted: the robot ignored


def test_world_models_save_and_load(trained, tmp_path):
    # A checkpoint alone rebuilds a world model (architecture, normalisers, weights), as for policies.
    from labkit.world_models.pixel import PixelWorldModel

    wm, _, val = trained
    back = W.load_world_model(wm.save(tmp_path / "wm.pt"))
    assert type(back) is W.StateWorldModel and back.config == wm.config
    s, a = torch.as_tensor(val["state"][:5]), torch.as_tensor(val["action"][:5])
    member = torch.tensor([0, 1, 2, 0, 1])
    for x, y in zip(wm.predict(s, a, member, sample=False), back.predict(s, a, member, sample=False), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    torch.manual_seed(0)
    pixel = PixelWorldModel(channels=4, latent=4)
    pixel.background.fill_(0.25)  # a trained buffer must travel too
    back = W.load_world_model(pixel.save(tmp_path / "pixel.pt"))
    frame = np.full((64, 64, 3), 100, np.uint8)
    np.testing.assert_array_equal(back.imagine(frame, np.zeros((3, 2), np.float32)),
                                  pixel.eval().imagine(frame, np.zeros((3, 2), np.float32)))
    with pytest.raises(ValueError, match="not a labkit world-model checkpoint"):
        torch.save({"world_model_class": "os.system", "init_args": {}, "state_dict": {}}, tmp_path / "bad.pt")
        W.load_world_model(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError):
        W.load_world_model(tmp_path / "missing.pt")


def test_pixel_predictor_keeps_the_frame_and_learns():
    from labkit.world_models.pixel import PixelPredictor, render_episodes, robot_position
    frames, actions = render_episodes(ENV, 2, max_steps=6)
    torch.manual_seed(0)
    wm = PixelPredictor(channels=8).fit(frames, actions, steps=30, window=2, batch_size=4, log_every=10)
    assert wm.history[-1]["recon"] < wm.history[0]["recon"]
    video = wm.imagine(frames[0, 0], actions[0])
    assert video.shape == (7, 64, 64, 3) and (video[0] == frames[0, 0]).all()  # step 0 is the real frame
    assert not np.isnan(robot_position(frames[0])).any()  # the robot is found in every real frame
