"""Record episodes into a LeRobotDataset v3 directory: `record(env, policy, root, episodes)` and `Recorder`.

Crash safety: `save_episode` puts the finished episode on disk before it returns. Its MP4s are written
as one file per episode; the current data Parquet file, tasks, stats and info are rewritten atomically
(tmp file + `os.replace`); and the episodes table, written last, is the commit point: the loader trusts
only episodes listed there. An interrupted recording therefore loses at most the episode in progress.
`finalize()` then joins the per-episode MP4s into one file per `VIDEO_FILES_SIZE_IN_MB` by stream
copy (no re-encoding), each episode located by its from/to timestamps, as LeRobot writes them.
"""

from __future__ import annotations

import inspect
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pyarrow as pa

from labkit.data import format as fmt
from labkit.data.format import DatasetError
from labkit.data.keys import feature_key


def _video_feature(h: int, w: int, fps: float) -> dict[str, Any]:
    return {"dtype": "video", "shape": [h, w, 3], "names": ["height", "width", "channels"],
            "info": {"video.height": h, "video.width": w, "video.codec": "h264", "video.pix_fmt": fmt.PIX_FMT,
                     "video.is_depth_map": False, "video.fps": fps, "video.channels": 3, "has_audio": False}}


def features_from_arrays(obs: dict[str, Any], action: Any, fps: float, camera: str = "top") -> dict[str, dict]:
    """The info.json `features` of observation/action arrays: uint8 HxWx3 arrays become videos."""
    features: dict[str, dict] = {}
    for key, value in obs.items():
        arr = np.asarray(value)
        name = feature_key(key, arr, camera)
        if ".images." in name:
            features[name] = _video_feature(*arr.shape[:2], fps)
        else:
            features[name] = {"dtype": str(arr.dtype), "shape": list(arr.shape), "names": None}
    act = np.asarray(action, dtype=np.float32)
    features["action"] = {"dtype": "float32", "shape": list(act.shape), "names": None}
    return features


def features_from_spaces(observation_space: gym.Space, action_space: gym.Space, fps: float,
                         camera: str = "top") -> dict[str, dict]:
    """The features an env produces, from its (Dict) observation space and its action space."""
    spaces = observation_space.spaces if isinstance(observation_space, gym.spaces.Dict) else {"state": observation_space}
    sample = {k: np.zeros(s.shape, s.dtype) for k, s in spaces.items()}
    return features_from_arrays(sample, np.zeros(action_space.shape, np.float32), fps, camera)


class Recorder:
    """Writes episodes frame by frame: `add_frame(...)` per step, `save_episode(...)` per episode.

    Use as a context manager (`with Recorder(root, fps) as rec:`) so `finalize()` runs at the end.
    `features` is inferred from the first frame when not given. Refuses a non-empty `root` unless
    `overwrite=True`, which deletes it first.
    """

    def __init__(self, root: str | Path, fps: float, features: dict[str, dict] | None = None, *,
                 env_id: str | None = None, env_kwargs: dict | None = None, task: str | None = None,
                 camera: str = "top", robot_type: str | None = None, overwrite: bool = False):
        self.root = Path(root)
        if self.root.exists() and (self.root.is_file() or any(self.root.iterdir())):
            if not overwrite:
                raise DatasetError(f"{self.root} already exists and is not empty; pass overwrite=True to replace "
                                   "it, or choose another directory")
            shutil.rmtree(self.root) if self.root.is_dir() else self.root.unlink()
        self.root.mkdir(parents=True, exist_ok=True)
        # An integral rate is stored as an int, as LeRobot writes it (fps: 30, not 30.0).
        self.fps = int(fps) if float(fps).is_integer() else float(fps)
        self.camera, self.robot_type = camera, robot_type
        self.task = task if task is not None else (env_id or "task")
        self.features = dict(features) if features else None
        self.labkit = {"env_id": env_id, "env_kwargs": _jsonable(env_kwargs or {})}
        self._frames: list[dict[str, np.ndarray]] = []  # the episode in progress
        self._file_episodes: list[dict[str, np.ndarray]] = []  # episodes of the current data file
        self._file_n, self._file_bytes = 0, 0
        self._episodes: list[dict[str, Any]] = []  # rows of meta/episodes
        self._stats: dict[str, dict] = {}
        self._tasks: dict[str, int] = {}
        self.total_frames, self.finalized = 0, False

    # ---- writing ----------------------------------------------------------------------------------
    def add_frame(self, obs: dict[str, Any], action: Any, reward: float = 0.0, done: bool = False,
                  success: bool = False) -> None:
        """Buffer one step: the observation, the action taken from it, and what the step returned."""
        if self.finalized:
            raise DatasetError(f"the recorder for {self.root} is finalized; start a new Recorder")
        action = _to_numpy(action).astype(np.float32)
        if self.features is None:
            self.features = features_from_arrays(obs, action, self.fps, self.camera)
        given = {feature_key(k, v, self.camera): v for k, v in obs.items()}
        given["action"] = action
        frame = {}
        for key, spec in self.features.items():
            if key not in given:
                raise DatasetError(f"frame is missing feature {key!r} (obs keys: {sorted(obs)}); features: {sorted(self.features)}")
            # a copy in the declared dtype: envs may reuse their observation buffers
            frame[key] = np.array(given[key], dtype=np.uint8 if fmt.is_image(spec) else spec["dtype"])
            if list(frame[key].shape) != list(spec["shape"]):
                raise DatasetError(f"feature {key!r} has shape {tuple(frame[key].shape)} in this frame but "
                                   f"{tuple(spec['shape'])} in the dataset")
        frame["next.reward"] = np.float32(reward)
        frame["next.done"] = np.bool_(done)
        frame["next.success"] = np.bool_(success)
        self._frames.append(frame)

    def save_episode(self, success: bool | None = None, seed: int | None = None, task: str | None = None) -> int:
        """Write the buffered episode to disk (it is safe there when this returns); returns its index."""
        if not self._frames:
            raise DatasetError("save_episode() called with no frames; call add_frame() first")
        ep, length, start = len(self._episodes), len(self._frames), self.total_frames
        task = self.task if task is None else task
        task_index = self._tasks.setdefault(task, len(self._tasks))
        cols = {k: np.stack([f[k] for f in self._frames]) for k in self._frames[0]}
        cols["next.done"][-1] = True  # the episode ends here, whether it terminated or was cut short
        frame_index = np.arange(length, dtype=np.int64)
        cols.update(timestamp=(frame_index / self.fps).astype(np.float32), frame_index=frame_index,
                    episode_index=np.full(length, ep, np.int64), index=start + frame_index,
                    task_index=np.full(length, task_index, np.int64))
        success = bool(cols["next.success"].any()) if success is None else bool(success)
        row: dict[str, Any] = {"episode_index": ep, "tasks": [task], "length": length,
                               "dataset_from_index": start, "dataset_to_index": start + length}
        # 1. videos: one file per episode while recording (file index = episode index).
        videos = {key: cols.pop(key) for key in self._video_keys()}
        for key, frames in videos.items():
            chunk, file = fmt.chunk_file(ep)
            fmt.write_video(self._video_path(key, chunk, file), frames, self.fps)
            row.update({f"videos/{key}/chunk_index": chunk, f"videos/{key}/file_index": file,
                        f"videos/{key}/from_timestamp": 0.0, f"videos/{key}/to_timestamp": length / self.fps})
        # 2. data: append to the current file (rolling over past DATA_FILES_SIZE_IN_MB) and rewrite it.
        if self._file_episodes and self._file_bytes > fmt.DATA_FILES_SIZE_IN_MB * 2**20:
            self._file_episodes, self._file_bytes, self._file_n = [], 0, self._file_n + 1
        self._file_episodes.append({k: cols[k] for k in self._data_columns()})
        self._file_bytes += sum(v.nbytes for v in cols.values())
        chunk, file = fmt.chunk_file(self._file_n)
        merged = {k: np.concatenate([e[k] for e in self._file_episodes]) for k in self._data_columns()}
        fmt.write_parquet(self.root / fmt.DATA_PATH.format(chunk_index=chunk, file_index=file),
                          pa.table({k: fmt.to_arrow(v) for k, v in merged.items()}))
        row.update({"data/chunk_index": chunk, "data/file_index": file,
                    "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0,
                    "success": success, "seed": seed})
        # 3. statistics (the episode's own go into its row, as LeRobot's stats/* columns), tasks and info;
        # 4. the episodes table last: the commit point.
        partials = {key: fmt.episode_stats(values) for key, values in cols.items()}
        # image stats come from the frames before encoding
        partials.update({key: fmt.episode_stats(frames, image=True) for key, frames in videos.items()})
        for key, partial in partials.items():
            self._stats[key] = fmt.merge_stats(self._stats.get(key), partial)
        row.update(fmt.stats_columns({key: self._finish(key, partial) for key, partial in partials.items()}))
        self._episodes.append(row)
        self.total_frames += length
        self._frames = []
        self._write_meta()
        return ep

    def finalize(self) -> Path:
        """Join the per-episode videos into consolidated files; the dataset is complete afterwards."""
        if self.finalized:
            return self.root
        if self._frames:
            warnings.warn(f"finalize(): dropping {len(self._frames)} frames of an episode that was never saved",
                          stacklevel=2)
            self._frames = []
        obsolete: list[Path] = []
        for key in self._video_keys():
            obsolete += self._consolidate(key)
        if obsolete:
            self._write_episodes()  # commit the new video spans, then remove the per-episode files
            for path in obsolete:
                path.unlink(missing_ok=True)
        self.finalized = True
        return self.root

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
            return
        # Interrupted (Ctrl-C, an env error): drop the episode in progress and still consolidate the saved
        # ones. They are loadable either way, so a failure here must not hide the original error.
        self._frames = []
        try:
            self.finalize()
        except Exception:  # noqa: BLE001
            pass

    # ---- helpers ----------------------------------------------------------------------------------
    def _video_keys(self) -> list[str]:
        return [k for k, f in (self.features or {}).items() if fmt.is_image(f)]

    def _data_columns(self) -> list[str]:
        low_dim = [k for k, f in self.features.items() if not fmt.is_image(f)]
        return [*low_dim, *fmt.INDEX_FEATURES, *fmt.NEXT_FEATURES]

    def _video_path(self, key: str, chunk: int, file: int) -> Path:
        return self.root / fmt.VIDEO_PATH.format(video_key=key, chunk_index=chunk, file_index=file)

    def _consolidate(self, key: str) -> list[Path]:
        """Concatenate runs of per-episode videos; each run's file takes its first episode's file name,
        so the old episodes table stays valid until the new one is committed."""
        limit = fmt.VIDEO_FILES_SIZE_IN_MB * 2**20
        groups: list[list[dict]] = []
        size = 0
        for row in self._episodes:
            path = self._video_path(key, row[f"videos/{key}/chunk_index"], row[f"videos/{key}/file_index"])
            if not groups or size + path.stat().st_size > limit:
                groups.append([])
                size = 0
            groups[-1].append(row)
            size += path.stat().st_size
        obsolete = []
        for group in groups:
            paths = [self._video_path(key, r[f"videos/{key}/chunk_index"], r[f"videos/{key}/file_index"]) for r in group]
            if len(paths) > 1:
                fmt.concat_videos(paths, paths[0])
                obsolete += paths[1:]
            t = 0.0
            for r in group:
                r[f"videos/{key}/chunk_index"] = group[0][f"videos/{key}/chunk_index"]
                r[f"videos/{key}/file_index"] = group[0][f"videos/{key}/file_index"]
                r[f"videos/{key}/from_timestamp"], t = t, t + r["length"] / self.fps
                r[f"videos/{key}/to_timestamp"] = t
        return obsolete

    def _finish(self, key: str, partial: dict[str, np.ndarray]) -> dict[str, list]:
        spec = self.features.get(key) or fmt.INDEX_FEATURES.get(key) or fmt.NEXT_FEATURES[key]
        return fmt.finish_stats(partial, spec["shape"], image=fmt.is_image(spec))

    def _write_meta(self) -> None:
        tasks = list(self._tasks)
        _write_tasks(self.root / fmt.TASKS_PATH, tasks)
        fmt.write_json(self.root / fmt.STATS_PATH, {key: self._finish(key, p) for key, p in self._stats.items()})
        n = len(self._episodes)
        info = {
            "codebase_version": fmt.CODEBASE_VERSION, "robot_type": self.robot_type,
            "total_episodes": n, "total_frames": self.total_frames, "total_tasks": len(tasks),
            "chunks_size": fmt.CHUNKS_SIZE, "data_files_size_in_mb": fmt.DATA_FILES_SIZE_IN_MB,
            "video_files_size_in_mb": fmt.VIDEO_FILES_SIZE_IN_MB, "fps": self.fps, "splits": {"train": f"0:{n}"},
            "data_path": fmt.DATA_PATH, "video_path": fmt.VIDEO_PATH if self._video_keys() else None,
            "features": fmt.with_interface({**self.features, **fmt.INDEX_FEATURES, **fmt.NEXT_FEATURES}, self.labkit),
            "labkit": self.labkit,
        }
        fmt.write_json(self.root / fmt.INFO_PATH, info)
        self._write_episodes()

    def _write_episodes(self) -> None:
        columns = {k: [row[k] for row in self._episodes] for k in self._episodes[0]}
        table = pa.table({k: pa.array(v, type=pa.int64() if k == "seed" else None) for k, v in columns.items()})
        fmt.write_parquet(self.root / fmt.EPISODES_PATH.format(chunk_index=0, file_index=0), table)


def _write_tasks(path: Path, tasks: list[str]) -> None:
    """tasks.parquet as LeRobot reads it with pandas: the task string is the index, plus `task_index`."""
    import pandas as pd

    df = pd.DataFrame({"task_index": np.arange(len(tasks), dtype=np.int64)}, index=pd.Index(tasks, name="task"))
    fmt.write_parquet(path, pa.Table.from_pandas(df))


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor from a learned policy
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _jsonable(d: dict) -> dict:
    """The JSON-serialisable part of env kwargs (tuples become lists), for info.json."""
    out = {}
    for k, v in d.items():
        try:
            out[k] = json.loads(json.dumps(v))
        except TypeError:
            warnings.warn(f"env kwarg {k}={v!r} is not JSON-serialisable; not stored in info.json", stacklevel=3)
    return out


# ---- record(): roll out a policy in an env and store every episode ----------------------------------
def _reset_policy(policy: Any, seed: int) -> None:
    reset = getattr(policy, "reset", None)
    if reset is None:
        return
    try:
        params = inspect.signature(reset).parameters
    except (TypeError, ValueError):
        params = {}
    reset(seed=seed) if "seed" in params else reset()


def record(env: str | gym.Env, policy: Any, root: str | Path, episodes: int, seed: int = 0,
           env_kwargs: dict | None = None, task: str | None = None, progress: bool = True,
           overwrite: bool = False, max_steps: int | None = None) -> Path:
    """Roll out `policy` for `episodes` episodes and save them as a dataset at `root`; returns `root`.

    `policy` is a labkit policy (`select_action(obs)` + `reset()`) or a callable `obs -> action`
    with an optional `reset(seed=...)`, such as `labkit.envs.expert(env)`. Episode i resets the
    env and the policy with `seed + i`, so a dataset is reproducible from its info.json. An env that
    names each episode's task in `info["task"]` (a string) has it stored per episode instead of `task`.
    """
    from tqdm.auto import tqdm

    own_env = isinstance(env, str)
    if own_env:
        env = gym.make(env, **(env_kwargs or {}))
    spec = getattr(env, "spec", None) or getattr(env.unwrapped, "spec", None)
    env_id = spec.id if spec else None
    kwargs = dict(env_kwargs) if env_kwargs is not None else dict(spec.kwargs if spec else {})
    act = policy.select_action if hasattr(policy, "select_action") else policy
    if not callable(act):
        raise TypeError(f"policy must be callable obs -> action or have select_action(obs); got {type(policy).__name__}")
    fps = env.metadata.get("render_fps") or 1.0 / getattr(env.unwrapped, "control_dt", 1.0)
    fps = int(fps) if float(fps).is_integer() else float(fps)
    camera = getattr(env.unwrapped, "camera", "top") or "top"
    if task is None:
        doc = (type(env.unwrapped).__doc__ or "").strip().splitlines()
        task = doc[0] if doc else (env_id or "task")
    features = features_from_spaces(env.observation_space, env.action_space, fps, camera)
    rec = Recorder(root, fps, features, env_id=env_id, env_kwargs=kwargs, task=task, camera=camera,
                   overwrite=overwrite)
    successes = 0
    bar = tqdm(range(episodes), desc=f"recording {env_id or 'episodes'}", disable=not progress, unit="ep")
    try:
        with rec:
            for i in bar:
                obs, info = env.reset(seed=seed + i)
                _reset_policy(policy, seed + i)
                done, steps, success = False, 0, bool(info.get("is_success", False))
                while not done and (max_steps is None or steps < max_steps):
                    action = _to_numpy(act(obs)).astype(np.float32).reshape(env.action_space.shape)
                    next_obs, reward, terminated, truncated, info = env.step(action)
                    done = bool(terminated or truncated)
                    success = bool(info.get("is_success", False))
                    rec.add_frame(obs, action, reward, done, success)
                    obs, steps = next_obs, steps + 1
                # A multi-task env names each episode's task (info["task"], e.g. Tabletop's instruction):
                # it is stored per episode, as LeRobot records instructions, over the one label `task`.
                said = info.get("task")
                rec.save_episode(success=success, seed=seed + i, task=said if isinstance(said, str) else None)
                successes += success
                bar.set_postfix(success=f"{successes}/{i + 1}")
    finally:
        bar.close()
        if own_env:
            env.close()
    return rec.root
