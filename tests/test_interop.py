"""LeRobot interoperability without LeRobot: the files labkit writes carry every field LeRobot writes
(so a format drift fails here, not in a user's LeRobot run), the env interface survives LeRobot's dataset
tools or training refuses to guess it, a dataset laid out as LeRobot's `lerobot/pusht` trains unchanged,
and Stable-Baselines3's subprocess envs find labkit's tasks. The round trip through LeRobot itself is
`make interop` (tools/interop.py), in its own virtual environment."""

from __future__ import annotations

import functools
import json

import gymnasium as gym
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from labkit.data import DATASETS, Recorder, load_dataset
from labkit.data import format as fmt
from labkit.fitting.cli import EpisodeData
from labkit.policies import BCPolicy
from labkit.policies.base import MissingInterfaceError
from labkit.policies.train import fit

# ---- the fields LeRobot 0.4.4 writes (github.com/huggingface/lerobot, tag v0.4.4) ----------------------
# src/lerobot/datasets/utils.py, create_empty_dataset_info(): every key of meta/info.json.
LEROBOT_INFO_KEYS = {"codebase_version", "robot_type", "total_episodes", "total_frames", "total_tasks",
                     "chunks_size", "data_files_size_in_mb", "video_files_size_in_mb", "fps", "splits",
                     "data_path", "video_path", "features"}
# src/lerobot/datasets/utils.py, DEFAULT_FEATURES: the bookkeeping features every dataset has.
LEROBOT_DEFAULT_FEATURES = {"timestamp", "frame_index", "episode_index", "index", "task_index"}
# src/lerobot/datasets/compute_stats.py, get_feature_stats() with DEFAULT_QUANTILES [0.01, 0.10, 0.50,
# 0.90, 0.99] named f"q{int(q * 100):02d}": every stats.json entry and every episode's stats/* cell.
LEROBOT_STATS = {"min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99"}
# src/lerobot/datasets/lerobot_dataset.py: LeRobotDatasetMetadata.save_episode() (episode_index, tasks,
# length, flatten_dict({"stats": ...})), _save_episode_data() (data/*, dataset_from/to_index),
# _save_episode_metadata() (meta/episodes/*) and _save_episode_video() (videos/<key>/*).
LEROBOT_EPISODE_COLUMNS = {"episode_index", "tasks", "length", "data/chunk_index", "data/file_index",
                           "dataset_from_index", "dataset_to_index", "meta/episodes/chunk_index",
                           "meta/episodes/file_index"}
LEROBOT_VIDEO_COLUMNS = ("chunk_index", "file_index", "from_timestamp", "to_timestamp")
# src/lerobot/datasets/video_utils.py, get_video_info() (+ get_audio_info's has_audio): a video feature's "info".
LEROBOT_VIDEO_INFO = {"video.height", "video.width", "video.codec", "video.pix_fmt", "video.is_depth_map",
                      "video.fps", "video.channels", "has_audio"}

INTERFACE = {"env_id": "labkit/PushT-v0", "env_kwargs": {"frame": "block", "actions": "relative"}}


def _record(root, episodes=3, length=6, camera=True):
    """A small dataset written by labkit's Recorder: state, a 16 px camera, actions, PushT's interface."""
    rng = np.random.default_rng(0)
    with Recorder(root, fps=10, env_id=INTERFACE["env_id"], env_kwargs=INTERFACE["env_kwargs"], task="push") as rec:
        for e in range(episodes):
            for t in range(length + e):
                obs = {"state": rng.normal(size=3).astype(np.float32)}
                if camera:
                    obs["pixels"] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                rec.add_frame(obs, rng.normal(size=2), reward=0.0, success=t == length + e - 1)
            rec.save_episode(seed=e)
    return root


def _episodes_table(root):
    return pq.read_table(next((root / "meta" / "episodes").glob("chunk-*/file-*.parquet")))


def _stat_shape(spec):
    return (spec["shape"][-1], 1, 1) if fmt.is_image(spec) else tuple(spec["shape"])


def test_written_files_carry_every_field_lerobot_writes(tmp_path):
    root = _record(tmp_path / "ds")
    info = json.loads((root / fmt.INFO_PATH).read_text())
    assert LEROBOT_INFO_KEYS <= set(info), LEROBOT_INFO_KEYS - set(info)
    assert LEROBOT_DEFAULT_FEATURES <= set(info["features"])
    assert all({"dtype", "shape", "names"} <= set(f) for f in info["features"].values())
    video = info["features"]["observation.images.top"]
    assert video["dtype"] == "video" and LEROBOT_VIDEO_INFO <= set(video["info"])

    # stats.json: every numeric feature (cameras included), every statistic, LeRobot's shapes.
    stats = json.loads((root / fmt.STATS_PATH).read_text())
    numeric = {k for k, f in info["features"].items() if f["dtype"] != "string"}
    assert set(stats) == numeric
    for key, entry in stats.items():
        assert set(entry) == LEROBOT_STATS, (key, set(entry))
        for name, value in entry.items():
            want = (1,) if name == "count" else _stat_shape(info["features"][key])
            assert np.asarray(value).shape == want, (key, name)

    # The episodes table: LeRobot's columns, and stats/<feature>/<stat> for every feature and statistic.
    table = _episodes_table(root)
    columns = set(table.column_names)
    expected = LEROBOT_EPISODE_COLUMNS | {f"videos/observation.images.top/{c}" for c in LEROBOT_VIDEO_COLUMNS}
    expected |= {f"stats/{k}/{s}" for k in numeric for s in LEROBOT_STATS}
    assert expected <= columns, sorted(expected - columns)

    # tasks.parquet as pandas reads it in LeRobot's load_tasks: the task string is the index.
    tasks = pd.read_parquet(root / fmt.TASKS_PATH)
    assert list(tasks.columns) == ["task_index"] and tasks.loc["push", "task_index"] == 0


def test_quantiles_are_lerobots(tmp_path):
    """Per-episode quantiles are the episode's own (np.quantile); the dataset's are their frame-weighted
    mean, as LeRobot's aggregate_stats combines episodes; a camera's are per channel in [0, 1]."""
    root = _record(tmp_path / "ds")
    ds = load_dataset(root)
    table = _episodes_table(root).to_pydict()
    per_episode, weights = [], []
    for e in range(ds.num_episodes):
        action = ds.episode(e)["action"]
        want = np.quantile(action, [0.01, 0.10, 0.50, 0.90, 0.99], axis=0)
        got = np.array([table[f"stats/action/{q}"][e] for q in ("q01", "q10", "q50", "q90", "q99")])
        np.testing.assert_allclose(got, want, rtol=1e-6)
        assert table["stats/action/count"][e] == [len(action)]
        per_episode.append(want)
        weights.append(len(action))
    dataset_q = np.array([ds.stats["action"][q] for q in ("q01", "q10", "q50", "q90", "q99")])
    np.testing.assert_allclose(dataset_q, np.average(per_episode, axis=0, weights=weights), rtol=1e-6)
    q50 = np.asarray(ds.stats["observation.images.top"]["q50"])
    assert q50.shape == (3, 1, 1) and 0.3 < q50.min() and q50.max() < 0.7  # uniform noise: about 0.5


def test_episode_quantiles_equal_numpys_bit_for_bit():
    """episode_stats' quantiles come from one sort, not np.quantile: the same numbers exactly, at every
    length (1 frame, 2, odd, even), scale, rounded values (ties) and a NaN (np.quantile's answer)."""
    rng = np.random.default_rng(0)
    qs = list(fmt.QUANTILES.values())
    cases = [rng.normal(size=(n, d)) * scale for n in (1, 2, 3, 7, 60, 61, 997) for d in (1, 384)
             for scale in (1e-3, 1.0, 1e4)]
    cases += [np.round(rng.normal(size=(50, 4))), np.full((9, 2), 3.0), np.array([[0.0], [np.nan], [1.0]])]
    for x in cases:
        got = fmt.episode_stats(x)
        want = np.quantile(x, qs, axis=0)
        for i, name in enumerate(fmt.QUANTILES):
            assert np.array_equal(got[name], want[i], equal_nan=True), (x.shape, name)


@pytest.mark.parametrize("name", sorted(p.name for p in DATASETS.iterdir() if (p / "meta" / "info.json").exists()))
def test_shipped_meta_is_current(name):
    """Each shipped dataset's meta carries quantiles, per-episode stats and the interface in its action
    feature (read from the files only; `refresh_meta` in labkit/data/refresh.py regenerates them)."""
    root = DATASETS / name
    info = json.loads((root / fmt.INFO_PATH).read_text())
    stats = json.loads((root / fmt.STATS_PATH).read_text())
    numeric = {k for k, f in info["features"].items() if f["dtype"] != "string"}
    assert set(stats) == numeric and all(set(stats[k]) == LEROBOT_STATS for k in numeric)
    columns = set(pq.read_schema(next((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))).names)
    assert {f"stats/{k}/{s}" for k in numeric for s in LEROBOT_STATS} <= columns
    assert info["features"]["action"]["labkit"] == info["labkit"]


def _strip_like_lerobot(root, keep_feature_copy: bool) -> None:
    """What LeRobot's split/delete/merge write: info.json rebuilt from create_empty_dataset_info (unknown
    top-level fields such as "labkit" gone, `features` copied verbatim) and an episodes table of LeRobot's
    columns only (labkit's success and seed gone)."""
    info = json.loads((root / fmt.INFO_PATH).read_text())
    info = {k: v for k, v in info.items() if k in LEROBOT_INFO_KEYS}
    if not keep_feature_copy:  # data recorded elsewhere, or with labkit before the copy existed
        info["features"]["action"].pop("labkit")
    (root / fmt.INFO_PATH).write_text(json.dumps(info))
    path = next((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    table = pq.read_table(path)
    pq.write_table(table.drop_columns(["success", "seed"]), path)


def test_interface_survives_lerobot_tools(tmp_path):
    root = _record(tmp_path / "ds", camera=False)
    _strip_like_lerobot(root, keep_feature_copy=True)
    ds = load_dataset(root)
    assert ds.info["labkit"] == INTERFACE  # restored from the action feature's copy
    assert ds.episodes["success"].tolist() == [True] * 3  # restored from next.success
    policy = BCPolicy.from_dataset(ds, horizon=4, n_action_steps=2)
    assert policy.data_env == INTERFACE


def test_training_refuses_a_dataset_without_interface(tmp_path):
    root = _record(tmp_path / "ds", camera=False)
    _strip_like_lerobot(root, keep_feature_copy=False)
    ds = load_dataset(root)
    with pytest.raises(MissingInterfaceError, match="env_kwargs"):
        BCPolicy.from_dataset(ds, horizon=4, n_action_steps=2)
    with pytest.raises(MissingInterfaceError, match="--data.env"):
        EpisodeData(str(root))  # `labkit fit`'s data path
    # Given explicitly, it trains, and the policy knows where to be rolled out.
    data = EpisodeData(str(root), env=INTERFACE, batch_size=8, steps_per_epoch=2)
    policy = BCPolicy({"horizon": 4, "n_action_steps": 2}, data.shapes, data.stats, data.env)
    fit(policy, data.data, steps=3, batch_size=8, progress=False)
    assert policy.data_env == INTERFACE
    assert BCPolicy.from_dataset(ds, env={}, horizon=4, n_action_steps=2).data_env == {}  # none, said explicitly


def _write_lerobot_pusht(root, lengths=(5, 7)) -> None:
    """A tiny dataset laid out as LeRobot records `lerobot/pusht` (its meta/info.json, v3.0), written
    without labkit's recorder: observation.image as video (H.264 here; the hub's is AV1), observation.state
    (agent_pos), action, next.reward/done/success, LeRobot's bookkeeping columns and episodes table."""
    rng = np.random.default_rng(1)
    n = sum(lengths)
    motors = {"motors": ["motor_0", "motor_1"]}
    scalar = {"shape": [1], "names": None}
    features = {
        "observation.image": {"dtype": "video", "shape": [96, 96, 3], "names": ["height", "width", "channel"],
                              "info": {"video.height": 96, "video.width": 96, "video.codec": "h264",
                                       "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": 10,
                                       "video.channels": 3, "has_audio": False}},
        "observation.state": {"dtype": "float32", "shape": [2], "names": motors},
        "action": {"dtype": "float32", "shape": [2], "names": motors},
        "episode_index": {"dtype": "int64", **scalar}, "frame_index": {"dtype": "int64", **scalar},
        "timestamp": {"dtype": "float32", **scalar}, "next.reward": {"dtype": "float32", **scalar},
        "next.done": {"dtype": "bool", **scalar}, "next.success": {"dtype": "bool", **scalar},
        "index": {"dtype": "int64", **scalar}, "task_index": {"dtype": "int64", **scalar},
    }
    info = {"codebase_version": "v3.0", "robot_type": "unknown", "total_episodes": len(lengths), "total_frames": n,
            "total_tasks": 1, "chunks_size": 1000, "data_files_size_in_mb": 100, "video_files_size_in_mb": 500,
            "fps": 10, "splits": {"train": f"0:{len(lengths)}"}, "data_path": fmt.DATA_PATH,
            "video_path": fmt.VIDEO_PATH, "features": features}
    (root / "meta").mkdir(parents=True)
    (root / fmt.INFO_PATH).write_text(json.dumps(info, indent=4))
    episode = np.repeat(np.arange(len(lengths)), lengths)
    frame = np.concatenate([np.arange(k) for k in lengths])
    last = frame == np.repeat(np.asarray(lengths) - 1, lengths)
    frames = {"observation.state": rng.uniform(0, 512, (n, 2)).astype(np.float32),
              "action": rng.uniform(0, 512, (n, 2)).astype(np.float32),
              "episode_index": episode, "frame_index": frame, "timestamp": (frame / 10).astype(np.float32),
              "next.reward": rng.uniform(0, 1, n).astype(np.float32), "next.done": last, "next.success": last,
              "index": np.arange(n), "task_index": np.zeros(n, np.int64)}
    path = root / fmt.DATA_PATH.format(chunk_index=0, file_index=0)
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({k: fmt.to_arrow(v) for k, v in frames.items()}), path)
    video = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
    fmt.write_video(root / fmt.VIDEO_PATH.format(video_key="observation.image", chunk_index=0, file_index=0), video, 10)
    ends = np.cumsum(lengths)
    key = "videos/observation.image"
    table = {"episode_index": list(range(len(lengths))), "tasks": [["Push the T-shaped block onto the T-shaped target."]] * len(lengths),
             "length": list(lengths), "data/chunk_index": [0] * len(lengths), "data/file_index": [0] * len(lengths),
             "dataset_from_index": (ends - lengths).tolist(), "dataset_to_index": ends.tolist(),
             f"{key}/chunk_index": [0] * len(lengths), f"{key}/file_index": [0] * len(lengths),
             f"{key}/from_timestamp": ((ends - lengths) / 10).tolist(), f"{key}/to_timestamp": (ends / 10).tolist(),
             "meta/episodes/chunk_index": [0] * len(lengths), "meta/episodes/file_index": [0] * len(lengths)}
    path = root / fmt.EPISODES_PATH.format(chunk_index=0, file_index=0)
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table(table), path)
    pd.DataFrame({"task_index": [0]}, index=["Push the T-shaped block onto the T-shaped target."]).to_parquet(
        root / fmt.TASKS_PATH)
    # No stats.json: the loader computes it, as for any dataset that lacks one.


def test_lerobot_pusht_layout_trains_unchanged(tmp_path):
    root = tmp_path / "pusht"
    _write_lerobot_pusht(root)
    ds = load_dataset(root)
    assert ds.num_episodes == 2 and len(ds) == 12 and ds.frames["observation.image"].shape == (12, 96, 96, 3)
    assert ds.success_rate == 1.0
    data = EpisodeData(str(root), batch_size=4, steps_per_epoch=2)  # no interface given: inferred
    assert data.env == {"env_id": "labkit/GymPushT-v0", "env_kwargs": {"obs_mode": "pixels"}}
    config = {"obs_keys": ("observation.state", "observation.image"), "horizon": 4, "n_action_steps": 2,
              "image_dim": 8}
    policy = BCPolicy(config, data.shapes, data.stats, data.env)
    assert policy.normalizer.modes["observation.image"] == "identity"  # a camera, not a vector
    fit(policy, data.data, steps=2, batch_size=4, progress=False)
    assert np.isfinite(float(policy.loss_history[-1]))


def test_subproc_vec_env_finds_labkit_env():
    """Gymnasium has no plugin hook: a fresh (spawned) process knows labkit's envs only when the id names
    the module that registers them, "labkit.envs:labkit/Detour-v0". SB3's SubprocVecEnv children are such
    processes; `gym.make` is pickled by reference, so nothing imports labkit in them but the id."""
    from stable_baselines3.common.vec_env import SubprocVecEnv

    envs = SubprocVecEnv([functools.partial(gym.make, "labkit.envs:labkit/Detour-v0")] * 2, start_method="spawn")
    try:
        obs = envs.reset()
        assert obs["state"].shape[0] == 2
        obs, rewards, dones, infos = envs.step(np.stack([envs.action_space.sample()] * 2))
        assert rewards.shape == (2,) and "is_success" in infos[0]
    finally:
        envs.close()


def test_lerobot_pusht_stats_cover_cameras(tmp_path):
    """Without a stats.json the loader computes one with LeRobot's statistics, the camera included."""
    root = tmp_path / "pusht"
    _write_lerobot_pusht(root)
    stats = load_dataset(root).stats
    assert set(stats["observation.image"]) == LEROBOT_STATS
    assert np.asarray(stats["observation.image"]["q99"]).shape == (3, 1, 1)
