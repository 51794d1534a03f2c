"""labkit.data.minari: labkit dataset -> Minari -> labkit round trip, recover_environment(), a dataset made
with Minari's own API, and named errors. Every Minari dataset lives in a temporary MINARI_DATASETS_PATH."""

from __future__ import annotations

import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest

pytest.importorskip("minari")
pytest.importorskip("h5py")  # minari[hdf5]

import minari  # noqa: E402
from minari.data_collector import EpisodeBuffer  # noqa: E402

import labkit  # noqa: E402,F401  (registers the envs)
from labkit.data import DatasetError, EpisodeDataset, load_dataset, open_dataset, record  # noqa: E402
from labkit.data.minari import from_minari, to_minari  # noqa: E402

EPISODES = 4
COLUMNS = ("observation.state", "observation.proprio", "action", "next.reward", "next.done", "next.success")


@pytest.fixture(scope="module", autouse=True)
def minari_root(tmp_path_factory):
    """Minari writes under $MINARI_DATASETS_PATH (default ~/.minari/datasets): a temp dir for these tests."""
    root = tmp_path_factory.mktemp("minari")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(root))
        yield root


@pytest.fixture(scope="module")
def detour():
    return open_dataset("detour").select(range(EPISODES))


@pytest.fixture(scope="module")
def exported(detour):
    return to_minari(detour, "labkit/detour-v0")


def _minari_buffers(env: gym.Env, episodes: int, seed: int = 0) -> list[EpisodeBuffer]:
    """Random-action episodes as Minari EpisodeBuffers (N+1 observations), without Minari's jax collector."""
    buffers = []
    for e in range(episodes):
        obs, _ = env.reset(seed=seed + e)
        env.action_space.seed(seed + e)
        steps = {"obs": [obs], "act": [], "rew": [], "term": [], "trunc": []}
        done = False
        while not done:
            action = env.action_space.sample()
            obs, reward, terminated, truncated, _ = env.step(action)
            for k, v in zip(steps, (obs, action, reward, terminated, truncated), strict=True):
                steps[k].append(v)
            done = terminated or truncated
        buffers.append(EpisodeBuffer(id=e, seed=seed + e, observations=np.asarray(steps["obs"]),
                                     actions=np.asarray(steps["act"]), rewards=steps["rew"],
                                     terminations=steps["term"], truncations=steps["trunc"]))
    return buffers


def _make_minari(dataset_id: str, env: gym.Env, episodes: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Minari's "author is None" provenance warnings
        return minari.create_dataset_from_buffers(dataset_id, _minari_buffers(env, episodes), env=env)


# ---- labkit -> Minari -> labkit ---------------------------------------------------------------------
def test_export_writes_minari_episodes(detour, exported):
    m = minari.load_dataset("labkit/detour-v0")  # read back from disk by Minari itself
    assert m.total_episodes == EPISODES and m.total_steps == len(detour)
    assert m.observation_space == gym.make("labkit/Detour-v0").observation_space
    for e, ep in enumerate(m.iterate_episodes()):
        lab = detour.episode(e)
        n = len(lab["action"])
        assert len(ep) == n and ep.observations["state"].shape == (n + 1, 6)
        np.testing.assert_array_equal(ep.observations["state"][:n], lab["observation.state"])
        np.testing.assert_array_equal(ep.actions, lab["action"])
        np.testing.assert_allclose(ep.rewards, lab["next.reward"], rtol=1e-6)
        # success ends a labkit episode (termination); otherwise the time limit does (truncation)
        assert ep.terminations[-1] == lab["next.success"][-1] and ep.truncations[-1] != ep.terminations[-1]
        assert not ep.terminations[:-1].any() and not ep.truncations[:-1].any()
        np.testing.assert_array_equal(ep.infos["is_success"][1:], lab["next.success"])


def test_round_trip_is_identical(detour, exported, tmp_path):
    root = from_minari("labkit/detour-v0", tmp_path / "back")
    back = load_dataset(root, env_id="labkit/Detour-v0")
    assert back.num_episodes == EPISODES
    np.testing.assert_array_equal(back.episode_from, detour.episode_from)
    np.testing.assert_array_equal(back.episode_to, detour.episode_to)
    for key in COLUMNS:
        assert back.frames[key].dtype == detour.frames[key].dtype, key
        np.testing.assert_array_equal(back.frames[key], detour.frames[key], err_msg=key)
    np.testing.assert_array_equal(back.episodes["seed"], detour.episodes["seed"])
    np.testing.assert_array_equal(back.episodes["success"], detour.episodes["success"])
    assert back.info["labkit"] == detour.info["labkit"] and back.fps == detour.fps


def test_final_observation_is_replayed_and_env_recovers(exported, detour):
    """The (N+1)th observation comes from replaying the episode in the env that recover_environment() makes."""
    env = minari.load_dataset("labkit/detour-v0").recover_environment()
    assert env.spec.id == "labkit/Detour-v0"
    ep = next(minari.load_dataset("labkit/detour-v0").iterate_episodes())
    obs, _ = env.reset(seed=int(detour.episodes["seed"][0]))
    for action in ep.actions:
        obs, *_ = env.step(action)
    np.testing.assert_array_equal(ep.observations["state"][-1], obs["state"])
    assert not np.array_equal(ep.observations["state"][-1], ep.observations["state"][-2])


def test_recover_environment_keeps_env_kwargs(tmp_path):
    kwargs = {"frame": "block", "actions": "relative"}
    env = gym.make("labkit/PushT-v0", **kwargs)
    root = record(env, labkit.envs.expert(env), tmp_path / "rel", episodes=2, env_kwargs=kwargs,
                  max_steps=8, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both episodes replay: no fallback warning
        m = to_minari(root, "labkit/pusht-rel-v0")
    recovered = m.recover_environment()
    assert recovered.spec.kwargs == kwargs and recovered.unwrapped.frame == "block"
    obs, _ = recovered.reset(seed=0)
    np.testing.assert_array_equal(obs["state"], load_dataset(root).frames["observation.state"][0])
    recovered.step(recovered.action_space.sample())
    assert load_dataset(from_minari(m, tmp_path / "back")).info["labkit"] == {"env_id": "labkit/PushT-v0",
                                                                              "env_kwargs": kwargs}


def test_failure_termination_comes_from_the_replay(tmp_path):
    """A crash terminates a Detour episode without success: only the replay can tell it from a time limit."""
    env = gym.make("labkit/Detour-v0")
    root = record(env, lambda obs: env.action_space.high, tmp_path / "crash", episodes=1, progress=False)
    ds = load_dataset(root)
    assert len(ds) < env.spec.max_episode_steps and not ds.frames["next.success"].any()  # it crashed
    ep = next(to_minari(root, "labkit/crash-v0").iterate_episodes())
    assert ep.terminations[-1] and not ep.truncations[-1]
    ep = next(to_minari(root, "labkit/crash-norep-v0", replay=False).iterate_episodes())
    assert ep.truncations[-1] and not ep.terminations[-1]  # unreplayed: labkit's contract (no success)


def test_diverging_replay_repeats_last_observation(detour):
    ep = detour.episode(1)
    ep["observation.state"] = ep["observation.state"] + 1.0  # no longer what the env produces
    ds = EpisodeDataset.from_episodes([detour.episode(0), ep], like=detour, success=detour.episodes["success"][:2])
    ds.episodes["seed"] = detour.episodes["seed"][:2]
    with pytest.warns(UserWarning, match="1 of 2 episodes could not be replayed"):
        m = to_minari(ds, "labkit/diverged-v0")
    last = list(m.iterate_episodes())[1].observations["state"]
    np.testing.assert_array_equal(last[-1], last[-2])


def test_pixel_dataset_exports_state_only(detour):
    # A pixel dataset in memory (no rendering needed): Detour's episodes with a camera stream beside them.
    eps = [{**detour.episode(e), "observation.images.top": np.zeros((int(n), 32, 32, 3), np.uint8)}
           for e, n in enumerate(detour.lengths[:2])]
    ds = EpisodeDataset.from_episodes(eps, like=detour)
    ds.info["labkit"]["env_kwargs"] = {"obs_mode": "pixels", "image_size": 32}
    with pytest.warns(UserWarning, match=r"state only: \['observation.images.top'\]"):
        m = to_minari(ds, "labkit/pix-v0", replay=False)
    assert "pixels" not in m.observation_space.spaces and m.env_spec.kwargs["obs_mode"] == "state"
    assert m.total_steps == int(detour.lengths[:2].sum())


# ---- a dataset made by Minari ------------------------------------------------------------------------
def test_import_dataset_made_by_minari(tmp_path):
    m = _make_minari("test/pendulum-v0", gym.make("Pendulum-v1", max_episode_steps=15), episodes=3)
    root = from_minari("test/pendulum-v0", tmp_path / "pendulum")
    ds = load_dataset(root, env_id="Pendulum-v1")
    assert ds.num_episodes == 3 and len(ds) == 45 and ds.fps == 30  # Pendulum's render_fps
    assert ds.info["labkit"]["env_id"] == "Pendulum-v1"
    eps = list(m.iterate_episodes())
    np.testing.assert_array_equal(ds.frames["observation.state"], np.concatenate([e.observations[:-1] for e in eps]))
    np.testing.assert_array_equal(ds.frames["action"], np.concatenate([e.actions for e in eps]).astype(np.float32))
    np.testing.assert_allclose(ds.frames["next.reward"], np.concatenate([e.rewards for e in eps]), rtol=1e-6)
    np.testing.assert_array_equal(ds.episodes["seed"], [0, 1, 2])
    assert ds.frames["next.done"][ds.episode_to - 1].all() and not ds.frames["next.success"].any()
    # what `labkit fit` builds from a dataset path
    from labkit.fitting.cli import EpisodeData

    data = EpisodeData(dataset=str(root), batch_size=8)
    assert data.shapes == {"observation.state": [3], "action": [1]} and data.env["env_id"] == "Pendulum-v1"


# ---- named errors ------------------------------------------------------------------------------------
def test_named_errors(detour, exported, tmp_path):
    with pytest.raises(FileExistsError, match="overwrite=True"):
        to_minari(detour, "labkit/detour-v0")
    with pytest.raises(DatasetError, match="no 'next.reward'"):  # a failed overwrite keeps the old dataset
        to_minari(EpisodeDataset.from_episodes([{"observation.state": np.zeros((3, 6), np.float32),
                                                 "action": np.zeros((3, 2), np.float32)}], fps=10),
                  "labkit/detour-v0", overwrite=True)
    assert minari.load_dataset("labkit/detour-v0").total_episodes == EPISODES
    with pytest.raises(ValueError, match="Malformed dataset ID"):
        to_minari(detour, "not a/valid id!")
    with pytest.raises(ValueError, match="episodes must be in 1..4"):
        to_minari(detour, "labkit/too-many-v0", episodes=9)
    with pytest.raises(FileNotFoundError, match="no local Minari dataset 'labkit/absent-v0'.*MINARI_DATASETS_PATH"):
        from_minari("labkit/absent-v0", tmp_path / "x")
    _make_minari("test/cartpole-v0", gym.make("CartPole-v1", max_episode_steps=5), episodes=1)
    with pytest.raises(DatasetError, match="continuous Box"):
        from_minari("test/cartpole-v0", tmp_path / "cartpole")
    from_minari("labkit/detour-v0", tmp_path / "once")
    with pytest.raises(DatasetError, match="already exists and is not empty"):
        from_minari("labkit/detour-v0", tmp_path / "once")


def test_cli_export_and_import(exported, tmp_path, capsys):
    from labkit.cli import main

    assert main(["minari", "export", "detour", "labkit/cli-v0", "--episodes", "2"]) == 0
    assert main(["minari", "import", "labkit/cli-v0", str(tmp_path / "back")]) == 0
    assert "2 episodes" in capsys.readouterr().out and load_dataset(tmp_path / "back").num_episodes == 2
    with pytest.raises(SystemExit) as exit_:
        main(["minari", "export", "detour", "labkit/cli-v0"])
    assert exit_.value.code == 2 and "--overwrite" in capsys.readouterr().err


def test_missing_minari_names_the_extra(monkeypatch, detour):
    monkeypatch.setitem(sys.modules, "minari", None)  # import minari -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'labkit\[minari\]'"):
        to_minari(detour, "labkit/x-v0")
