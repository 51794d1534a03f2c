"""labkit.data: record -> LeRobotDataset v3 on disk -> load, windows, normaliser, crash safety, errors."""

from __future__ import annotations

import io
import json

import gymnasium as gym
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import labkit
from labkit.data import (
    DatasetError,
    EpisodeDataset,
    Normalizer,
    Recorder,
    check_compatible,
    load_dataset,
    record,
)

ENV = "labkit/Detour-v0"
EPISODES = 5


def rollout(env: gym.Env, seed: int) -> dict[str, np.ndarray]:
    """Re-run one expert episode exactly as `record` does, to compare against what was stored."""
    policy = labkit.envs.expert(env)
    obs, _ = env.reset(seed=seed)
    policy.reset(seed=seed)
    out: dict[str, list] = {"state": [], "proprio": [], "pixels": [], "action": [], "reward": [], "success": []}
    done = False
    while not done:
        action = policy(obs)
        for k in ("state", "proprio", "pixels"):
            if k in obs:
                out[k].append(obs[k])
        obs, reward, terminated, truncated, info = env.step(action)
        out["action"].append(action)
        out["reward"].append(reward)
        out["success"].append(info["is_success"])
        done = terminated or truncated
    return {k: np.asarray(v) for k, v in out.items() if v}


@pytest.fixture(scope="module")
def state_ds(tmp_path_factory):
    env = gym.make(ENV)
    root = record(env, labkit.envs.expert(env), tmp_path_factory.mktemp("d") / "detour", EPISODES, seed=3,
                  progress=False)
    return root, load_dataset(root)


# ---- round trip ----------------------------------------------------------------------------------
def test_round_trip_arrays_and_boundaries(state_ds):
    root, ds = state_ds
    env = gym.make(ENV)
    eps = [rollout(env, 3 + i) for i in range(EPISODES)]
    lengths = [len(e["action"]) for e in eps]
    assert ds.num_episodes == EPISODES and len(ds) == sum(lengths)
    np.testing.assert_array_equal(ds.episode_to - ds.episode_from, lengths)
    np.testing.assert_array_equal(ds.episode_from, np.cumsum([0, *lengths[:-1]]))
    for i, e in enumerate(eps):
        got = ds.episode(i)
        np.testing.assert_array_equal(got["observation.state"], e["state"])
        np.testing.assert_array_equal(got["observation.proprio"], e["proprio"])
        np.testing.assert_array_equal(got["action"], e["action"])
        np.testing.assert_array_equal(got["next.reward"], e["reward"])
        np.testing.assert_array_equal(got["next.success"], e["success"])
        np.testing.assert_array_equal(got["frame_index"], np.arange(lengths[i]))
        np.testing.assert_allclose(got["timestamp"], np.arange(lengths[i]) / 10.0, atol=1e-6)
        assert (got["episode_index"] == i).all() and got["next.done"][-1] and not got["next.done"][:-1].any()
    np.testing.assert_array_equal(ds.frames["index"], np.arange(len(ds)))
    np.testing.assert_array_equal(ds.episodes["seed"], 3 + np.arange(EPISODES))
    assert ds.success_rate == np.mean([e["success"][-1] for e in eps])
    assert ds.frames["observation.state"].dtype == np.float32 and ds.frames["action"].shape == (len(ds), 2)


def test_on_disk_layout_info_and_stats(state_ds):
    root, ds = state_ds
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == ["data/chunk-000/file-000.parquet", "meta/episodes/chunk-000/file-000.parquet",
                     "meta/info.json", "meta/stats.json", "meta/tasks.parquet"]
    info = json.loads((root / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 10
    assert info["total_episodes"] == EPISODES and info["total_frames"] == len(ds)
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["features"]["observation.state"] == {"dtype": "float32", "shape": [6], "names": None}
    assert info["features"]["action"]["shape"] == [2]
    assert info["labkit"]["env_id"] == ENV
    data = pq.read_table(root / "data/chunk-000/file-000.parquet")
    assert {"observation.state", "observation.proprio", "action", "timestamp", "frame_index", "episode_index",
            "index", "task_index", "next.reward", "next.done", "next.success"} <= set(data.column_names)
    episodes = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pydict()
    assert episodes["dataset_to_index"][-1] == len(ds) and episodes["success"] == ds.episodes["success"].tolist()
    stats = json.loads((root / "meta/stats.json").read_text())
    for key in ("observation.state", "observation.proprio", "action"):
        x = ds.frames[key].astype(np.float64)
        np.testing.assert_allclose(stats[key]["min"], x.min(0), rtol=1e-6)
        np.testing.assert_allclose(stats[key]["max"], x.max(0), rtol=1e-6)
        np.testing.assert_allclose(stats[key]["mean"], x.mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(stats[key]["std"], x.std(0), rtol=1e-6, atol=1e-9)
        assert stats[key]["count"] == [len(ds)]


def test_select_splits_episodes(state_ds):
    _, ds = state_ds
    sub = ds.select([3, 1])
    assert sub.num_episodes == 2 and len(sub) == ds.lengths[3] + ds.lengths[1]
    np.testing.assert_array_equal(sub.episode(0)["action"], ds.episode(3)["action"])
    np.testing.assert_array_equal(sub.episode(1)["observation.state"], ds.episode(1)["observation.state"])
    np.testing.assert_array_equal(sub.episodes["seed"], ds.episodes["seed"][[3, 1]])
    np.testing.assert_allclose(sub.stats["action"]["max"], sub.frames["action"].max(0), rtol=1e-6)
    assert ds.select(range(2)).num_episodes == 2


def test_from_episodes_rebuilds_a_recorded_dataset(state_ds):
    _, ds = state_ds
    again = EpisodeDataset.from_episodes([ds.episode(i) for i in range(ds.num_episodes)], like=ds)
    assert sorted(again.frames) == sorted(ds.frames) and again.fps == ds.fps and again.tasks == ds.tasks
    for key, values in ds.frames.items():  # the index columns are recomputed, equal to the recorded ones
        np.testing.assert_array_equal(again.frames[key], values, err_msg=key)
        assert again.frames[key].dtype == values.dtype, key
    np.testing.assert_array_equal(again.episode_from, ds.episode_from)
    np.testing.assert_array_equal(again.episode_to, ds.episode_to)
    for key in ("observation.state", "action"):  # computed here vs the recorder's stats.json
        for name in ("min", "max", "mean", "std"):
            np.testing.assert_allclose(again.stats[key][name], ds.stats[key][name], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(again.episodes["length"], ds.lengths)


def test_from_episodes_by_hand():
    eps = [{"observation.state": np.arange(6, dtype=np.float32).reshape(3, 2), "action": np.ones((3, 1), np.float32)},
           {"observation.state": np.full((2, 2), 7, np.float32), "action": np.zeros((2, 1), np.float32)}]
    ds = EpisodeDataset.from_episodes(eps, fps=5, success=[False, True], columns={"label": np.arange(5) % 2})
    assert list(ds.frames) == ["observation.state", "action", "episode_index", "frame_index", "index",
                               "next.success", "label"]
    np.testing.assert_array_equal(ds.episode_from, [0, 3])
    np.testing.assert_array_equal(ds.episode_to, [3, 5])
    np.testing.assert_array_equal(ds.frames["episode_index"], [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(ds.frames["frame_index"], [0, 1, 2, 0, 1])
    np.testing.assert_array_equal(ds.frames["index"], np.arange(5))
    np.testing.assert_array_equal(ds.frames["next.success"], [False, False, False, False, True])
    np.testing.assert_array_equal(ds.episode(1)["observation.state"], eps[1]["observation.state"])
    assert ds.episodes["success"].tolist() == [False, True] and ds.episodes["length"].tolist() == [3, 2]
    assert ds.fps == 5.0 and ds.info["total_frames"] == 5 and ds.info["total_episodes"] == 2
    assert ds.info["features"]["observation.state"] == {"dtype": "float32", "shape": [2]}
    assert ds.info["features"]["label"]["shape"] == [1] and ds.success_rate == 0.5
    np.testing.assert_allclose(ds.stats["observation.state"]["mean"], [(0 + 2 + 4 + 14) / 5, (1 + 3 + 5 + 14) / 5])
    np.testing.assert_allclose(ds.stats["action"]["max"], [1.0])
    given = {"action": {"min": [-1.0], "max": [1.0]}}
    assert EpisodeDataset.from_episodes(eps, fps=5, stats=given).stats is given
    with pytest.raises(ValueError, match="fps"):
        EpisodeDataset.from_episodes(eps)
    with pytest.raises(ValueError, match="same number"):
        EpisodeDataset.from_episodes([{"observation.state": np.zeros((3, 2)), "action": np.zeros((2, 1))}], fps=5)
    with pytest.raises(ValueError, match="features"):
        EpisodeDataset.from_episodes([eps[0], {"action": np.zeros((2, 1))}], fps=5)
    with pytest.raises(ValueError, match="one value per frame"):
        EpisodeDataset.from_episodes(eps, fps=5, columns={"label": np.zeros(4)})
    with pytest.raises(ValueError, match="no episodes"):
        EpisodeDataset.from_episodes([], fps=5)


def test_pixels_round_trip_and_consolidation(tmp_path):
    env = gym.make(ENV, obs_mode="pixels")
    expert = labkit.envs.expert(env)
    root = tmp_path / "px"
    rec = Recorder(root, fps=10, env_id=ENV, env_kwargs={"obs_mode": "pixels"})
    for seed in range(2):
        obs, _ = env.reset(seed=seed)
        expert.reset(seed=seed)
        done = False
        while not done:
            action = expert(obs)
            next_obs, reward, term, trunc, info = env.step(action)
            done = term or trunc
            rec.add_frame(obs, action, reward, done, info["is_success"])
            obs = next_obs
        rec.save_episode(seed=seed)
    before = load_dataset(root)  # one MP4 per episode until finalize()
    rec.finalize()
    assert sorted(p.name for p in (root / "videos/observation.images.top/chunk-000").iterdir()) == ["file-000.mp4"]
    ds = load_dataset(root, env_id=ENV)
    truth = np.concatenate([rollout(env, s)["pixels"] for s in range(2)])
    frames = ds.frames["observation.images.top"]
    assert frames.shape == truth.shape == (len(ds), 96, 96, 3) and frames.dtype == np.uint8
    assert np.abs(frames.astype(np.int16) - truth).mean() < 8
    np.testing.assert_array_equal(frames, before.frames["observation.images.top"])  # stream copy: exact
    assert ds.info["features"]["observation.images.top"]["dtype"] == "video"
    spans = ds.episodes["videos/observation.images.top/from_timestamp"]
    np.testing.assert_allclose(spans, [0.0, ds.lengths[0] / 10.0])
    img = ds.stats["observation.images.top"]
    assert np.asarray(img["mean"]).shape == (3, 1, 1)
    np.testing.assert_allclose(np.asarray(img["mean"]).ravel(), (truth / 255.0).mean(axis=(0, 1, 2)), rtol=1e-6)


# ---- windows -------------------------------------------------------------------------------------
def test_windows_padding_against_hand_built_example(tmp_path):
    with Recorder(tmp_path / "tiny", fps=10) as rec:
        for ep, actions in enumerate(([0.0, 1.0, 2.0], [10.0, 11.0])):
            for t, a in enumerate(actions):
                state = np.array([100 * ep + t, 0.0], np.float32)  # frame identity in dim 0
                rec.add_frame({"state": state}, [a, -a], done=t == len(actions) - 1)
            rec.save_episode()
    ds = load_dataset(tmp_path / "tiny")
    w = ds.windows(obs_horizon=2, horizon=3)
    assert w["obs"]["observation.state"].shape == (5, 2, 2)
    assert w["action"].shape == (5, 3, 2) and w["action_is_pad"].shape == (5, 3)
    np.testing.assert_array_equal(w["obs"]["observation.state"][:, :, 0],
                                  [[0, 0], [0, 1], [1, 2], [100, 100], [100, 101]])
    np.testing.assert_array_equal(w["action"][:, :, 0],
                                  [[0, 1, 2], [1, 2, 2], [2, 2, 2], [10, 11, 11], [11, 11, 11]])
    np.testing.assert_array_equal(w["action"][:, :, 1], -w["action"][:, :, 0])
    np.testing.assert_array_equal(w["action_is_pad"],
                                  [[0, 0, 0], [0, 0, 1], [0, 1, 1], [0, 0, 1], [0, 1, 1]])


def test_windows_shapes_on_recorded_data(state_ds):
    _, ds = state_ds
    w = ds.windows(obs_horizon=2, horizon=16, keys=("observation.state", "observation.proprio"))
    n = len(ds)
    assert w["obs"]["observation.state"].shape == (n, 2, 6) and w["obs"]["observation.proprio"].shape == (n, 2, 4)
    assert w["action"].shape == (n, 16, 2) and w["action_is_pad"].dtype == bool
    # a frame r steps before its episode's end (r = 1 for the last) has horizon - r padded actions
    assert w["action_is_pad"].sum() == sum(max(0, 16 - r) for L in ds.lengths for r in range(1, L + 1))
    last = ds.episode_to - 1
    np.testing.assert_array_equal(w["action_is_pad"][last], np.tile([False] + [True] * 15, (ds.num_episodes, 1)))
    np.testing.assert_array_equal(w["obs"]["observation.state"][ds.episode_from, 0],
                                  ds.frames["observation.state"][ds.episode_from])
    with pytest.raises(DatasetError, match="observation.nope"):
        ds.windows(keys=("observation.nope",))


# ---- normaliser ----------------------------------------------------------------------------------
def test_normalizer(state_ds):
    _, ds = state_ds
    norm = ds.normalizer()
    assert norm.modes["action"] == "min_max" and norm.modes["observation.state"] == "mean_std"
    actions = torch.as_tensor(ds.frames["action"])
    na = norm.normalize("action", actions)
    torch.testing.assert_close(na.min(0).values, torch.tensor([-1.0, -1.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(na.max(0).values, torch.tensor([1.0, 1.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(norm.unnormalize("action", na), actions, atol=1e-5, rtol=0)

    state = torch.as_tensor(ds.frames["observation.state"], dtype=torch.float64)
    ns = norm.normalize("observation.state", state)
    assert torch.isfinite(ns).all()
    varying = torch.as_tensor(np.asarray(ds.stats["observation.state"]["std"]) > 1e-3)
    assert not varying.all()  # goal_y is constant in Detour: the constant-feature case
    torch.testing.assert_close(ns.mean(0)[varying], torch.zeros(int(varying.sum()), dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(ns.std(0, unbiased=False)[varying], torch.ones(int(varying.sum()), dtype=torch.float64),
                               atol=1e-4, rtol=0)
    assert (ns[:, ~varying].abs() < 1e-2).all()
    torch.testing.assert_close(norm.unnormalize("observation.state", ns), state, atol=1e-5, rtol=0)

    # a constant feature in min_max mode gives 0 and maps back, never inf/NaN
    const = Normalizer.from_stats({"action": {"min": [2.0], "max": [2.0], "mean": [2.0], "std": [0.0]}})
    out = const.normalize("action", torch.full((4, 1), 2.0))
    assert torch.isfinite(out).all() and (out == 0).all()
    assert (const.unnormalize("action", out) == 2.0).all()

    # statistics travel in the state dict; a fresh Normalizer is rebuilt from it alone
    buf = io.BytesIO()
    torch.save({"normalizer." + k: v for k, v in norm.state_dict().items()}, buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    fresh = Normalizer.from_state_dict(sd, prefix="normalizer.")
    assert fresh.modes == norm.modes
    torch.testing.assert_close(fresh.normalize("action", actions), na)
    blank = Normalizer({k: tuple(np.shape(ds.stats[k]["mean"])) for k in norm.modes}, {})
    blank.load_state_dict(norm.state_dict())
    assert blank.modes == norm.modes
    torch.testing.assert_close(blank.normalize("observation.state", state), ns)
    with pytest.raises(KeyError, match="observation.images.top"):
        norm.normalize("observation.images.top", actions)
    # identity keys need no statistics (images a network rescales itself), and survive a state-dict trip
    img = Normalizer.from_stats(ds.stats, {"observation.images.wrist": "identity"})
    x = torch.rand(2, 3)
    assert torch.equal(img.normalize("observation.images.wrist", x), x)
    torch.testing.assert_close(Normalizer.from_state_dict(img.state_dict()).normalize("observation.images.wrist", x), x)
    with pytest.raises(KeyError, match="observation.nope"):
        Normalizer.from_stats(ds.stats, {"observation.nope": "mean_std"})


# ---- crash safety and overwrite --------------------------------------------------------------------
def test_interrupted_recording_keeps_saved_episodes(tmp_path):
    env = gym.make(ENV)
    expert = labkit.envs.expert(env)
    root = tmp_path / "crash"
    rec = Recorder(root, fps=10, env_id=ENV)
    for seed in range(4):
        obs, _ = env.reset(seed=seed)
        expert.reset(seed=seed)
        for _ in range(12 if seed == 3 else 100):
            action = expert(obs)
            next_obs, reward, term, trunc, info = env.step(action)
            rec.add_frame(obs, action, reward, term or trunc, info["is_success"])
            obs = next_obs
            if term or trunc:
                break
        if seed < 3:
            rec.save_episode(seed=seed)
    del rec  # the process "dies": no finalize, episode 4 never saved
    ds = load_dataset(root, env_id=ENV)
    assert ds.num_episodes == 3 and len(ds) == ds.episode_to[-1]
    np.testing.assert_array_equal(ds.episodes["seed"], [0, 1, 2])

    with pytest.raises(KeyboardInterrupt), Recorder(tmp_path / "ctrl-c", fps=10) as rec:
        rec.add_frame({"state": np.zeros(3, np.float32)}, [0.0])
        rec.save_episode()
        rec.add_frame({"state": np.ones(3, np.float32)}, [1.0])
        raise KeyboardInterrupt
    ds = load_dataset(tmp_path / "ctrl-c")
    assert ds.num_episodes == 1 and len(ds) == 1 and not ds.frames["observation.state"].any()


def test_refuses_to_overwrite(state_ds, tmp_path):
    root, ds = state_ds
    env = gym.make(ENV)
    with pytest.raises(DatasetError, match="overwrite=True"):
        record(env, labkit.envs.expert(env), root, 1, progress=False)
    assert load_dataset(root).num_episodes == EPISODES  # untouched
    other = tmp_path / "again"
    record(env, labkit.envs.expert(env), other, 1, progress=False)
    record(env, labkit.envs.expert(env), other, 2, progress=False, overwrite=True)
    assert load_dataset(other).num_episodes == 2


# ---- errors --------------------------------------------------------------------------------------
def _copy(root, dst):
    import shutil

    shutil.copytree(root, dst)
    return dst


def test_missing_directory_and_files(state_ds, tmp_path):
    root, _ = state_ds
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nothing-here")
    broken = _copy(root, tmp_path / "no-data")
    (broken / "data/chunk-000/file-000.parquet").unlink()
    with pytest.raises(DatasetError, match=r"missing data file .*data/chunk-000/file-000\.parquet"):
        load_dataset(broken)
    no_info = _copy(root, tmp_path / "no-info")
    (no_info / "meta/info.json").unlink()
    with pytest.raises(DatasetError, match=r"missing file .*meta/info\.json"):
        load_dataset(no_info)


def test_corrupt_parquet(state_ds, tmp_path):
    root, _ = state_ds
    broken = _copy(root, tmp_path / "corrupt")
    (broken / "data/chunk-000/file-000.parquet").write_bytes(b"this is not parquet" * 50)
    with pytest.raises(DatasetError, match=r"data/chunk-000/file-000\.parquet is corrupt or unreadable"):
        load_dataset(broken)
    (broken / "meta/episodes/chunk-000/file-000.parquet").write_bytes(b"\x00garbage")
    with pytest.raises(DatasetError, match=r"meta/episodes/chunk-000/file-000\.parquet is corrupt"):
        load_dataset(broken)


class WiderDetour(gym.Env):
    """A stand-in env whose state has 7 dims instead of Detour's 6."""

    observation_space = gym.spaces.Dict({"state": gym.spaces.Box(-1, 1, (7,), np.float32),
                                         "proprio": gym.spaces.Box(-1, 1, (4,), np.float32)})
    action_space = gym.spaces.Box(-0.5, 0.5, (2,), np.float32)


def test_mismatched_env(state_ds):
    _, ds = state_ds
    check_compatible(ds, gym.make(ENV))  # the env it was recorded with fits
    with pytest.raises(DatasetError, match=r"'observation.state'.*\(6,\).*\(7,\)"):
        check_compatible(ds, WiderDetour())
    with pytest.raises(DatasetError, match=r"'action'.*\(2,\).*\(3,\)"):
        check_compatible(ds, ThreeDofDetour())


class ThreeDofDetour(WiderDetour):
    """Right observations, but a 3-dim action."""

    observation_space = gym.spaces.Dict({"state": gym.spaces.Box(-1, 1, (6,), np.float32),
                                         "proprio": gym.spaces.Box(-1, 1, (4,), np.float32)})
    action_space = gym.spaces.Box(-0.5, 0.5, (3,), np.float32)


class ZeroPolicy:
    """A stand-in learned policy: `select_action` returns a torch tensor, `reset()` takes no seed."""

    def __init__(self):
        self.resets = 0

    def reset(self):
        self.resets += 1

    def select_action(self, obs):
        return torch.zeros(2)


def test_record_learned_policy_and_rolled_files(tmp_path, monkeypatch):
    from labkit.data import format as fmt

    monkeypatch.setattr(fmt, "DATA_FILES_SIZE_IN_MB", 0)  # roll the data file after every episode
    policy = ZeroPolicy()
    root = record(ENV, policy, tmp_path / "zero", 3, seed=7, progress=False, max_steps=5)
    assert policy.resets == 3
    assert sorted(p.name for p in (root / "data/chunk-000").iterdir()) == ["file-000.parquet", "file-001.parquet",
                                                                          "file-002.parquet"]
    ds = load_dataset(root, env_id=ENV)
    assert ds.num_episodes == 3 and len(ds) == 15 and not ds.frames["action"].any()
    np.testing.assert_array_equal(ds.episodes["data/file_index"], [0, 1, 2])
    assert ds.frames["next.done"].reshape(3, 5)[:, -1].all() and ds.success_rate == 0.0


# ---- hardening: metadata that leaves the root, non-finite data, malformed metadata ----------------
class Whole:
    """What an info.json edit returns to replace the whole document (other edits change it in place)."""

    def __init__(self, value):
        self.value = value


def _edit_info(root, edit):
    """Rewrite root's meta/info.json: edit(info) changes it in place, or returns Whole(new document)."""
    path = root / "meta/info.json"
    info = json.loads(path.read_text())
    out = edit(info)
    path.write_text(json.dumps(out.value if isinstance(out, Whole) else info))


def _edit_column(path, name, edit):
    """Rewrite one column of a Parquet file: edit(values as numpy) -> new values (same length)."""
    from labkit.data import format as fmt

    table = pq.read_table(path)
    values = np.asarray(edit(fmt.from_arrow(table.column(name)).copy()))
    column = fmt.to_arrow(values)
    if values.ndim == 1:  # a scalar column keeps its Parquet type (float32 stays float32)
        column = column.cast(table.schema.field(name).type)
    pq.write_table(table.set_column(table.column_names.index(name), name, column), path)


@pytest.fixture(scope="module")
def pixel_root(tmp_path_factory):
    """A one-episode dataset with a 16x16 camera stream (a consolidated MP4)."""
    root = tmp_path_factory.mktemp("px") / "px"
    with Recorder(root, fps=10) as rec:
        for t in range(4):
            rec.add_frame({"pixels": np.full((16, 16, 3), 40 * t, np.uint8), "state": np.full(2, t, np.float32)},
                          [0.1 * t], done=t == 3)
        rec.save_episode()
    return root


DATA_TEMPLATE = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_TEMPLATE = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_data_path_outside_root_is_refused(state_ds, tmp_path, kind):
    root, _ = state_ds
    ds_root = _copy(root, tmp_path / "ds")
    _copy(root, tmp_path / "outside")  # a loadable data file outside the dataset
    outside = tmp_path / "outside" / DATA_TEMPLATE if kind == "absolute" else "../outside/" + DATA_TEMPLATE
    _edit_info(ds_root, lambda info: info.update(data_path=str(outside)))
    with pytest.raises(DatasetError, match=r"info\.json: field 'data_path' .*(outside the dataset|absolute path)"):
        load_dataset(ds_root)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "video_key"])
def test_video_path_outside_root_is_refused(pixel_root, tmp_path, kind):
    ds_root = _copy(pixel_root, tmp_path / "ds")
    load_dataset(ds_root)  # loads as recorded
    _copy(pixel_root, tmp_path / "outside")  # a decodable MP4 outside the dataset
    if kind == "video_key":  # the path's only moving part is the key: '../' hidden in a feature name
        key = "observation.images.top"
        evil = "../../outside/videos/observation.images.top/chunk-000/file-000.mp4"  # from <root>/videos/
        _edit_info(ds_root, lambda info: info.update(video_path="videos/{video_key}"))
        episodes_path = ds_root / "meta/episodes/chunk-000/file-000.parquet"
        table = pq.read_table(episodes_path)
        table = table.rename_columns([c.replace(key, evil) for c in table.column_names])
        pq.write_table(table, episodes_path)
        _edit_info(ds_root, lambda info: info["features"].update({evil: info["features"].pop(key)}))
    else:
        outside = tmp_path / "outside" / VIDEO_TEMPLATE if kind == "absolute" else "../outside/" + VIDEO_TEMPLATE
        _edit_info(ds_root, lambda info: info.update(video_path=str(outside)))
    with pytest.raises(DatasetError, match=r"info\.json: field 'video_path' .*(outside the dataset|absolute path)"):
        load_dataset(ds_root)


@pytest.mark.parametrize("column, bad, row", [("action", np.nan, 7), ("observation.state", np.inf, 12),
                                              ("next.reward", -np.inf, 3), ("action", np.nan, 0)])
def test_non_finite_data_is_refused(state_ds, tmp_path, column, bad, row):
    root, _ = state_ds
    ds_root = _copy(root, tmp_path / "ds")
    data = ds_root / "data/chunk-000/file-000.parquet"

    def poison(values):
        values = values.astype(np.float32)
        if values.ndim == 1:
            values[row] = bad
        else:
            values[row, -1] = bad
        return values

    _edit_column(data, column, poison)
    with pytest.raises(DatasetError, match=rf"data file .*file-000\.parquet: column '{column}' has a non-finite "
                                           rf"value \({bad}\) at row {row} \(episode 0, frame {row}\)"):
        load_dataset(ds_root)


def test_non_finite_stats_are_refused(state_ds, tmp_path):
    root, _ = state_ds
    ds_root = _copy(root, tmp_path / "ds")
    stats_path = ds_root / "meta/stats.json"
    stats = json.loads(stats_path.read_text())
    stats["action"]["std"][0] = float("nan")
    stats_path.write_text(json.dumps(stats))
    with pytest.raises(DatasetError, match=r"stats\.json: action\.std has a non-finite value"):
        load_dataset(ds_root)


def _pop(key):
    return lambda info: info.pop(key) and None


MALFORMED_INFO = {  # name -> (edit of info.json, what the message must say)
    "no features": (_pop("features"), r"field 'features' is missing"),
    "features a list": (lambda info: info.update(features=[1, 2]), r"field 'features' must be a non-empty JSON object"),
    "info a list": (lambda info: Whole([info]), r"expected a JSON object at the top level, got a JSON array"),
    "info a string": (lambda info: Whole("v3.0"), r"expected a JSON object .* got a JSON string"),
    "feature not an object": (lambda info: info["features"].update(action="float32"),
                              r"features\['action'\] must be a JSON object"),
    "shape not a list": (lambda info: info["features"]["action"].update(shape=2),
                         r"features\['action'\]\.shape must be a list"),
    "negative shape": (lambda info: info["features"]["action"].update(shape=[-2]),
                       r"features\['action'\]\.shape must be a list of .* positive integers"),
    "huge shape": (lambda info: info["features"]["action"].update(shape=[10**6, 10**6]),
                   r"features\['action'\]\.shape .* more than"),
    "no index": (lambda info: info["features"].pop("index"), r"features has no 'index'"),
    "data_path not a string": (lambda info: info.update(data_path=7), r"field 'data_path' must be a path template"),
    "data_path unknown field": (lambda info: info.update(data_path="data/{chunk_index.__class__}.parquet"),
                                r"field 'data_path' .* may only use"),
    "data_path huge width": (lambda info: info.update(data_path="data/{chunk_index:0999999999d}.parquet"),
                             r"field 'data_path' .* may only use"),
}
BAD_FPS = [0, -10, "fast", None, [10], True, float("nan"), float("inf")]


@pytest.mark.parametrize("name", list(MALFORMED_INFO))
def test_malformed_info_is_a_dataset_error(state_ds, tmp_path, name):
    root, _ = state_ds
    ds_root = _copy(root, tmp_path / "ds")
    edit, message = MALFORMED_INFO[name]
    _edit_info(ds_root, edit)
    with pytest.raises(DatasetError, match=r"meta/info\.json: " + message):
        load_dataset(ds_root)


@pytest.mark.parametrize("fps", BAD_FPS + ["missing"], ids=repr)
def test_bad_fps_is_refused(state_ds, tmp_path, fps):
    root, _ = state_ds
    ds_root = _copy(root, tmp_path / "ds")
    _edit_info(ds_root, _pop("fps") if fps == "missing" else lambda info: info.update(fps=fps))
    with pytest.raises(DatasetError, match=r"meta/info\.json: field 'fps' (must be a positive number|is missing)"):
        load_dataset(ds_root)


@pytest.mark.parametrize("size", [2, 3, 6])
def test_wrong_declared_shape_names_file_and_feature(state_ds, tmp_path, size):
    root, _ = state_ds
    ds_root = _copy(root, tmp_path / "ds")
    _edit_info(ds_root, lambda info: info["features"]["observation.state"].update(shape=[size]))
    expected = [2, 3] if size == 6 else [size]  # 6 values per frame of observation.state fit [6], not [2, 3]
    if size == 6:
        _edit_info(ds_root, lambda info: info["features"]["observation.state"].update(shape=expected))
        load_dataset(ds_root)  # the same number of values: a reshape, not an error
        _edit_info(ds_root, lambda info: info["features"]["timestamp"].update(shape=[2]))
        column, held = "timestamp", "one value per row"
    else:
        column, held = "observation.state", "6 values per row"
    with pytest.raises(DatasetError, match=rf"data file .*file-000\.parquet: column '{column}' holds {held} but "
                                           rf"info\.json declares features\['{column}'\]\.shape"):
        load_dataset(ds_root)


def test_video_shape_must_match_declared(pixel_root, tmp_path):
    ds_root = _copy(pixel_root, tmp_path / "ds")
    _edit_info(ds_root, lambda info: info["features"]["observation.images.top"].update(shape=[32, 16, 3]))
    with pytest.raises(DatasetError, match=r"video file .*file-000\.mp4 has frames of shape \(16, 16, 3\) but "
                                           r"info\.json declares features\['observation.images.top'\]\.shape"):
        load_dataset(ds_root)


@pytest.mark.parametrize("length", [2**40, 30_000_000, -5])
def test_impossible_episode_length_fails_before_allocating(state_ds, tmp_path, length):
    import tracemalloc

    root, _ = state_ds
    ds_root = _copy(root, tmp_path / "ds")

    def stretch(values):
        values[1] = length
        return values

    _edit_column(ds_root / "meta/episodes/chunk-000/file-000.parquet", "length", stretch)
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError, match=r"episodes table .*file-000\.parquet: column 'length' (.*does "
                                               r"not add up to the \d+ frames|has a negative value)"):
            load_dataset(ds_root)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50e6, f"{peak / 1e6:.0f} MB allocated before the error"


def test_missing_episodes_column_is_a_dataset_error(state_ds, tmp_path):
    root, _ = state_ds
    ds_root = _copy(root, tmp_path / "ds")
    path = ds_root / "meta/episodes/chunk-000/file-000.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["length"]), path)
    with pytest.raises(DatasetError, match=r"episodes table .*file-000\.parquet has no column 'length'"):
        load_dataset(ds_root)


def test_shipped_datasets_still_load():
    roots = sorted(p for p in labkit.data.DATASETS.iterdir() if (p / "meta/info.json").is_file())
    assert roots
    for root in roots:
        ds = load_dataset(root)
        assert ds.num_episodes > 0 and ds.fps > 0, root
