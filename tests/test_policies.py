"""The policy contract and behavior cloning: loss falls, queue semantics, checkpoints, bad input."""

import gymnasium as gym
import numpy as np
import pytest
import torch

import labkit
from labkit.data import load_dataset, record
from labkit.policies import BCPolicy, fit
from labkit.policies.train import window_tensors


def test_bc_loss_falls_and_shapes(detour_ds):
    policy = BCPolicy.from_dataset(detour_ds, horizon=8, n_action_steps=4, hidden=64, layers=2)
    fit(policy, detour_ds, steps=150, batch_size=64, progress=False)
    losses = policy.losses()
    assert len(losses) == 150 and np.isfinite(losses).all()
    assert losses[-20:].mean() < 0.5 * losses[:20].mean()
    obs = {"observation.state": torch.zeros(5, 2, 6)}
    assert policy.predict_action_chunk(obs).shape == (5, 8, 2)


def test_masked_loss_ignores_padding(detour_ds):
    policy = BCPolicy.from_dataset(detour_ds, horizon=4, n_action_steps=2, hidden=32, layers=1)
    t = window_tensors(policy, detour_ds)
    obs = policy.normalize_obs({k: v[:32] for k, v in t["obs"].items()})
    action, pad = t["action"][:32].clone(), t["action_is_pad"][:32].clone()
    pad[:, -1] = True
    base = policy.loss(obs, action, pad)
    action[:, -1] += 100.0  # garbage on padded steps must not move the loss
    assert torch.allclose(policy.loss(obs, action, pad), base)


def test_fit_trains_with_a_handed_in_training_step(detour_ds):
    """`fit(training_step=fn)`: what a lesson hands in is what trains (the student's code, not labkit's)."""
    def small():
        torch.manual_seed(0)
        return BCPolicy.from_dataset(detour_ds, horizon=4, n_action_steps=2, hidden=32, layers=1)

    def unmasked(policy, batch):  # a plausible wrong answer: padding counted as data
        obs = policy.normalize_obs(batch["obs"])
        action = policy.normalizer.normalize("action", batch["action"].float())
        return (policy.predict_normalized(obs) - action).pow(2).mean()

    runs = {}
    for name, step in [("default", None), ("same", lambda p, b: p.batch_loss(b)), ("unmasked", unmasked)]:
        policy = fit(small(), detour_ds, steps=30, batch_size=32, seed=0, progress=False, training_step=step)
        runs[name] = torch.nn.utils.parameters_to_vector(policy.parameters()).detach()
        assert policy.batch_loss_fn is None  # only for the length of one fit
    assert torch.equal(runs["default"], runs["same"])
    assert not torch.allclose(runs["default"], runs["unmasked"])
    with pytest.raises(TypeError, match="training_step must be a function"):
        fit(small(), detour_ds, steps=1, progress=False, training_step="bc")


def test_select_action_executes_n_action_steps_per_chunk(detour_ds):
    policy = BCPolicy.from_dataset(detour_ds, horizon=8, n_action_steps=3, hidden=32, layers=1)
    calls = []
    original = policy.predict_action_chunk
    policy.predict_action_chunk = lambda batch: calls.append(batch) or original(batch)
    env = gym.make("labkit/Detour-v0")
    obs, _ = env.reset(seed=0)
    policy.reset()
    for _ in range(7):
        a = policy.select_action(obs)
        assert a.shape == (2,) and a.dtype == np.float32
        obs = env.step(a)[0]
    assert len(calls) == 3  # steps 0, 3, 6
    first = calls[0]["observation.state"]
    assert first.shape == (1, 2, 6) and torch.equal(first[0, 0], first[0, 1])  # history padded at the start
    batch = {k: np.stack([obs[k]] * 4) for k in obs}  # a batch of envs
    policy.reset()
    assert policy.select_action(batch).shape == (4, 2)


def test_checkpoint_round_trip(detour_ds, tmp_path):
    policy = BCPolicy.from_dataset(detour_ds, horizon=8, n_action_steps=4, hidden=32, layers=1)
    fit(policy, detour_ds, steps=20, batch_size=32, progress=False)
    obs = {"observation.state": torch.randn(3, 2, 6)}
    path = policy.save(tmp_path / "p.ckpt")
    loaded = labkit.load_policy(path)
    assert isinstance(loaded, BCPolicy) and loaded.config == policy.config
    torch.testing.assert_close(loaded.predict_action_chunk(obs), policy.predict_action_chunk(obs))
    # The normaliser travels in the checkpoint: same statistics, not recomputed.
    torch.testing.assert_close(loaded.normalizer.normalize("action", torch.ones(2)),
                               policy.normalizer.normalize("action", torch.ones(2)))


def test_lightning_checkpoint_loads_too(detour_ds, tmp_path):
    import lightning as L

    policy = BCPolicy.from_dataset(detour_ds, hidden=32, layers=1)
    trainer = L.Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(policy, train_dataloaders=labkit.training.RandomBatches(window_tensors(policy, detour_ds), 8, 3))
    trainer.save_checkpoint(tmp_path / "l.ckpt")
    loaded = labkit.load_policy(tmp_path / "l.ckpt")
    obs = {"observation.state": torch.randn(2, 2, 6)}
    torch.testing.assert_close(loaded.predict_action_chunk(obs), policy.eval().predict_action_chunk(obs))


def test_bad_checkpoints_and_inputs(detour_ds, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        labkit.load_policy(tmp_path / "missing.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        labkit.load_policy(tmp_path / "junk.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a labkit policy"):
        labkit.load_policy(tmp_path / "other.ckpt")
    policy = BCPolicy.from_dataset(detour_ds, hidden=16, layers=1)
    with pytest.raises(KeyError, match="state"):
        policy.select_action({"proprio": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match="shape"):
        policy.select_action({"state": np.zeros(5, np.float32)})
    with pytest.raises(ValueError, match="n_action_steps"):
        BCPolicy.from_dataset(detour_ds, horizon=4, n_action_steps=8)


def test_pixel_bc_trains(tmp_path):
    env = gym.make("labkit/Detour-v0", obs_mode="pixels")
    root = record(env, labkit.envs.expert(env), tmp_path / "px", episodes=2, seed=0, progress=False)
    ds = load_dataset(root)
    policy = BCPolicy.from_dataset(ds, obs_keys=("observation.images.top", "observation.proprio"),
                                   horizon=4, n_action_steps=2, hidden=32, layers=1)
    fit(policy, ds, steps=15, batch_size=16, progress=False)
    assert np.isfinite(policy.losses()).all()
    obs, _ = env.reset(seed=1)
    policy.reset()
    assert policy.select_action(obs).shape == (2,)


def test_cli_eval_reads_a_saved_policy(detour_ds, tmp_path, capsys):
    # One way to train (fit() in Python, `labkit fit --config` on the command line): `labkit train` is gone.
    from labkit.cli import main

    ckpt = fit(BCPolicy.from_dataset(detour_ds, horizon=4, n_action_steps=2), detour_ds, steps=20,
               progress=False).save(tmp_path / "bc.ckpt")
    assert main(["eval", str(ckpt), "labkit/Detour-v0", "--episodes", "3"]) == 0
    assert "over 3 episodes" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", str(detour_ds.root), str(tmp_path / "x.ckpt")])


def test_policy_keeps_the_env_frame_its_data_was_recorded_in(tmp_path):
    """A PushT policy trained in the block frame is rolled out in the block frame, after a checkpoint
    round trip too; asking for the world frame is a named error, not a silent 0%."""
    from labkit.policies import load_policy
    from labkit.policies.base import rollout_kwargs

    env = gym.make("labkit/PushT-v0", frame="block")
    root = record(env, labkit.envs.expert(env), tmp_path / "block", episodes=2, env_kwargs={"frame": "block"},
                  progress=False, max_steps=20)
    ds = load_dataset(root, env_id="labkit/PushT-v0")
    policy = BCPolicy.from_dataset(ds, horizon=4, n_action_steps=2, hidden=32, layers=1)
    assert policy.data_env == {"env_id": "labkit/PushT-v0", "env_kwargs": {"frame": "block"}}
    loaded = load_policy(policy.save(tmp_path / "p.ckpt"))
    assert loaded.data_env == policy.data_env
    assert rollout_kwargs(loaded, "labkit/PushT-v0", {"friction": 0.8}) == {"friction": 0.8, "frame": "block"}
    with pytest.raises(ValueError, match="frame='block'"):
        labkit.eval.evaluate(loaded, "labkit/PushT-v0", episodes=1, env_kwargs={"frame": "world"}, progress=False)
    res = labkit.eval.evaluate(loaded, "labkit/PushT-v0", episodes=1, progress=False)
    assert res.episodes == 1

    world = BCPolicy.from_dataset(load_dataset(labkit.data.DATASETS / "pusht"), hidden=32, layers=1)
    assert rollout_kwargs(world, "labkit/PushT-v0", {}) == {}  # the default frame is not passed on
    with pytest.raises(ValueError, match="frame='world'"):
        rollout_kwargs(world, "labkit/PushT-v0", {"frame": "block"})
    assert rollout_kwargs(world, "labkit/Detour-v0", {"x": 1}) == {"x": 1}  # another task: untouched


def test_policy_keeps_relative_actions(tmp_path):
    """Relative actions are part of the interface too: a policy trained on them is rolled out with
    them, and absolute actions are refused by name (a 2.5 cm move read as a point would go nowhere)."""
    from labkit.policies.base import rollout_kwargs

    kwargs = {"frame": "block", "actions": "relative"}
    env = gym.make("labkit/PushT-v0", **kwargs)
    root = record(env, labkit.envs.expert(env), tmp_path / "rel", episodes=1, env_kwargs=kwargs,
                  progress=False, max_steps=10)
    policy = BCPolicy.from_dataset(load_dataset(root), horizon=4, n_action_steps=2, hidden=32, layers=1)
    assert rollout_kwargs(policy, "labkit/PushT-v0", {}) == kwargs
    with pytest.raises(ValueError, match="actions='relative'.*actions='absolute'"):
        rollout_kwargs(policy, "labkit/PushT-v0", {"actions": "absolute"})


@pytest.mark.slow  # `labkit demo` (still in make test; skipped by make test-fast)
def test_demo_trains_the_configs_recipe(tmp_path, capsys):
    """`make demo` reads configs/flow_pusht.yaml: the policy it saves has the config's chunking and
    the dataset's interface (block frame, relative actions), and it writes its video and plot."""
    import yaml

    from labkit.cli import ROOT, demo
    from labkit.policies import load_policy

    recipe = yaml.safe_load((ROOT / "configs" / "flow_pusht.yaml").read_text())["model"]["init_args"]["config"]
    demo(steps=3, episodes=1, out=tmp_path)
    policy = load_policy(tmp_path / "policy.ckpt")
    assert type(policy).__name__ == "FlowPolicy"
    assert all(getattr(policy.config, k) == v for k, v in recipe.items()), (policy.config, recipe)
    assert policy.data_env["env_kwargs"] == {"frame": "block", "actions": "relative"}
    assert (tmp_path / "rollout.mp4").stat().st_size > 0 and (tmp_path / "loss.png").is_file()
    assert "success" in capsys.readouterr().out


def test_sensor_noise_on_a_constant_feature_keeps_actions_in_bounds(detour_ds, tmp_path):
    """Detour's goal_y is 0.7 in every frame (std 0). Dividing by a 1e-6 floor turned 0.002 of sensor
    noise into inputs of ~2000 and actions of 20-65 (the bounds are +-0.5): a constant feature must
    normalise to 0, so noisy observations give the same actions as clean ones, also after a checkpoint."""
    from labkit.envs.detour import MAX_SPEED

    assert np.ptp(detour_ds.frames["observation.state"][:, 5]) == 0  # the premise: goal_y is constant
    policy = BCPolicy.from_dataset(detour_ds, horizon=8, n_action_steps=4, hidden=64, layers=2)
    fit(policy, detour_ds, steps=100, batch_size=64, progress=False)
    loaded = labkit.load_policy(policy.save(tmp_path / "p.ckpt"))
    obs = window_tensors(policy, detour_ds)["obs"]["observation.state"][:512]
    g = torch.Generator().manual_seed(0)
    noisy = obs + 0.002 * torch.randn(obs.shape, generator=g)
    for p in (policy, loaded):
        clean_a = p.predict_action_chunk({"observation.state": obs})
        noisy_a = p.predict_action_chunk({"observation.state": noisy})
        assert noisy_a.abs().max() < 2 * MAX_SPEED, noisy_a.abs().max()
        assert (noisy_a - clean_a).abs().max() < 0.1 * MAX_SPEED
