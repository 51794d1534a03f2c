"""Load a LeRobotDataset v3 directory into memory as an `EpisodeDataset` of numpy arrays.

    ds = load_dataset("datasets/detour")           # frames concatenated over episodes
    ds.frames["action"], ds.episode(0), ds.select(range(10))
    w = ds.windows(obs_horizon=2, horizon=16)       # Diffusion Policy style training samples
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from labkit.data import format as fmt
from labkit.data.format import DatasetError
from labkit.data.normalize import Normalizer
from labkit.data.recorder import features_from_spaces


class EpisodeDataset:
    """Episodes as arrays: `frames[key]` is [N, ...] over all frames, episode e is rows
    `episode_from[e]:episode_to[e]`; `episodes[col]` holds per-episode metadata (success, seed, ...)."""

    def __init__(self, frames: dict[str, np.ndarray], episode_from: np.ndarray, episode_to: np.ndarray,
                 info: dict[str, Any], stats: dict[str, dict], episodes: dict[str, np.ndarray],
                 tasks: list[str] | None = None, root: Path | None = None):
        self.frames, self.info, self.stats, self.episodes = frames, info, stats, episodes
        self.episode_from = np.asarray(episode_from, np.int64)
        self.episode_to = np.asarray(episode_to, np.int64)
        self.tasks, self.root = tasks or [], root

    @classmethod
    def from_episodes(cls, episodes: list[dict[str, np.ndarray]], fps: float | None = None, success=None,
                      columns: dict[str, np.ndarray] | None = None, stats: dict[str, dict] | None = None,
                      like: EpisodeDataset | None = None, tasks: list[str] | None = None) -> EpisodeDataset:
        """An in-memory dataset of `episodes`, each a {feature: [T, ...]} dict (the same features in every
        episode, all T long in one episode), laid end to end in the order given.

        Frames: the episodes' features, then the index columns episode_index, frame_index and index
        (recomputed if the episodes carry them), then "next.success" (True on each successful episode's
        last frame) when `success` (one flag per episode) is given and the episodes have no such column,
        then `columns`: extra per-frame arrays over all frames (e.g. labels). The episodes table:
        episode_index, length and, with `success`, success. Features are read off the arrays.
        `like` (a dataset the episodes come from or resemble) lends its info (fps, feature metadata),
        tasks and, under the recomputed ones, its stats (image stats, say). Stats: `stats` as given, or
        else computed on every numeric non-image column (as `select` does)."""
        if not episodes:
            raise ValueError("no episodes to build a dataset from")
        if fps is None and like is None:
            raise ValueError("give the dataset's fps (or a dataset `like` to take it from)")
        bookkeeping = ("episode_index", "frame_index", "index")
        keys = [k for k in episodes[0] if k not in bookkeeping]
        lengths = []
        for i, ep in enumerate(episodes):
            if set(ep) - set(bookkeeping) != set(keys):
                raise ValueError(f"episode {i} has features {sorted(ep)}; episode 0 has {sorted(keys)}")
            n = {len(ep[k]) for k in keys}
            if len(n) != 1 or 0 in n:
                raise ValueError(f"episode {i}: every feature needs the same number (>= 1) of frames, got "
                                 f"{ {k: len(ep[k]) for k in keys} }")
            lengths.append(n.pop())
        lengths = np.asarray(lengths, np.int64)
        to = np.cumsum(lengths)
        total = int(to[-1])
        frames = {k: np.concatenate([np.asarray(ep[k]) for ep in episodes]) for k in keys}
        frames["episode_index"] = np.repeat(np.arange(len(episodes)), lengths)
        frames["frame_index"] = np.concatenate([np.arange(n) for n in lengths])
        frames["index"] = np.arange(total)
        table = {"episode_index": np.arange(len(episodes)), "length": lengths}
        if success is not None:
            success = np.asarray(success, bool)
            if success.shape != (len(episodes),):
                raise ValueError(f"success needs one flag per episode ({len(episodes)}), got shape {success.shape}")
            table["success"] = success
            if "next.success" not in frames:
                frames["next.success"] = np.zeros(total, bool)
                frames["next.success"][to - 1] = success
        for key, values in (columns or {}).items():
            if len(values) != total:
                raise ValueError(f"column {key!r} needs one value per frame ({total}), got {len(values)}")
            frames[key] = np.asarray(values)
        features = {k: {"dtype": str(v.dtype), "shape": list(v.shape[1:]) or [1]} for k, v in frames.items()}
        if like is None:
            info = {"fps": float(fps), "features": features}
        else:
            info = copy.deepcopy(like.info)
            info["features"] = {**features, **info.get("features", {})}
            if fps is not None:
                info["fps"] = float(fps)
            if "splits" in info:
                info["splits"] = {"train": f"0:{len(episodes)}"}
        info.update(total_episodes=len(episodes), total_frames=total)
        if stats is None:
            stats = compute_stats(frames, info["features"], images=False)
            if like is not None:
                stats = {**copy.deepcopy(like.stats), **stats}
        if tasks is None and like is not None:
            tasks = like.tasks
        return cls(frames, to - lengths, to, info, stats, table, tasks)

    # ---- basic access -----------------------------------------------------------------------------
    @property
    def num_episodes(self) -> int:
        return len(self.episode_from)

    def __len__(self) -> int:
        return int(self.episode_to[-1]) if self.num_episodes else 0

    @property
    def fps(self) -> float:
        return float(self.info["fps"])

    @property
    def lengths(self) -> np.ndarray:
        return self.episode_to - self.episode_from

    @property
    def success_rate(self) -> float:
        """Fraction of successful episodes (NaN when the dataset does not record success)."""
        if "success" in self.episodes:
            return float(np.mean(self.episodes["success"])) if self.num_episodes else float("nan")
        if "next.success" in self.frames:
            return float(np.mean([self.frames["next.success"][a:b].any() for a, b in zip(self.episode_from, self.episode_to, strict=True)]))
        return float("nan")

    def episode(self, i: int) -> dict[str, np.ndarray]:
        """All frame arrays of the i-th episode of this dataset (0 <= i < num_episodes)."""
        if not -self.num_episodes <= i < self.num_episodes:
            raise IndexError(f"episode {i} out of range: the dataset has {self.num_episodes} episodes")
        a, b = self.episode_from[i], self.episode_to[i]
        return {k: v[a:b] for k, v in self.frames.items()}

    def __repr__(self) -> str:
        keys = ", ".join(f"{k}{tuple(v.shape[1:])}" for k, v in self.frames.items() if k.startswith(("observation", "action")))
        return f"EpisodeDataset({self.num_episodes} episodes, {len(self)} frames, {self.fps:g} fps: {keys})"

    # ---- subsets ----------------------------------------------------------------------------------
    def select(self, episode_indices: Any) -> EpisodeDataset:
        """A new dataset of the given episodes (positions in this dataset), e.g. a split or the first N demos.
        Low-dim stats are recomputed on the subset; image stats are kept from the parent."""
        idx = np.arange(self.num_episodes)[episode_indices] if isinstance(episode_indices, slice) \
            else np.asarray(list(episode_indices) if not isinstance(episode_indices, np.ndarray) else episode_indices, np.int64)
        if idx.size and (idx.min() < -self.num_episodes or idx.max() >= self.num_episodes):
            raise IndexError(f"episode indices {idx.tolist()} out of range for {self.num_episodes} episodes")
        lengths = self.lengths[idx]
        to = np.cumsum(lengths)
        start = to - lengths
        # rows = concatenation of arange(from_e, to_e) over selected episodes, without a Python loop
        rows = np.repeat(self.episode_from[idx] - start, lengths) + np.arange(int(to[-1]) if len(to) else 0)
        frames = {k: v[rows] for k, v in self.frames.items()}
        stats = {**copy.deepcopy(self.stats), **compute_stats(frames, self.info["features"], images=False)}
        info = {**copy.deepcopy(self.info), "total_episodes": len(idx), "total_frames": int(len(rows)),
                "splits": {"train": f"0:{len(idx)}"}}
        episodes = {k: v[idx] for k, v in self.episodes.items()}
        return EpisodeDataset(frames, start, to, info, stats, episodes, self.tasks, self.root)

    # ---- training samples -------------------------------------------------------------------------
    def window_indices(self, obs_horizon: int = 2, horizon: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Frame indices for every sample t: observations t-obs_horizon+1..t clamped to the episode start,
        actions t..t+horizon-1 clamped to its end, and the padding mask. Gather images lazily with these."""
        if obs_horizon < 1 or horizon < 1:
            raise ValueError(f"obs_horizon and horizon must be >= 1, got {obs_horizon}, {horizon}")
        t = np.arange(len(self))
        episode = np.repeat(np.arange(self.num_episodes), self.lengths)
        first, last = self.episode_from[episode][:, None], self.episode_to[episode][:, None] - 1
        obs_idx = np.maximum(t[:, None] + np.arange(1 - obs_horizon, 1), first)
        act_idx = t[:, None] + np.arange(horizon)
        is_pad = act_idx > last
        return obs_idx, np.minimum(act_idx, last), is_pad

    def windows(self, obs_horizon: int = 2, horizon: int = 16,
                keys: tuple[str, ...] | list[str] = ("observation.state",)) -> dict[str, Any]:
        """One sample per frame t: {"obs": {key: [N, obs_horizon, ...]}, "action": [N, horizon, A],
        "action_is_pad": [N, horizon] bool, "index": [N]}. Before an episode starts its first frame is
        repeated; past its end its last action is repeated (and marked as padding), as Diffusion Policy does."""
        missing = [k for k in keys if k not in self.frames]
        if missing:
            raise DatasetError(f"windows(): no feature {missing} in this dataset; it has {sorted(self.frames)}")
        obs_idx, act_idx, is_pad = self.window_indices(obs_horizon, horizon)
        return {"obs": {k: self.frames[k][obs_idx] for k in keys}, "action": self.frames["action"][act_idx],
                "action_is_pad": is_pad, "index": np.arange(len(self))}

    def normalizer(self, modes: dict[str, str] | None = None) -> Normalizer:
        """A `Normalizer` from this dataset's stats (action: min_max, low-dim observations: mean_std)."""
        return Normalizer.from_stats(self.stats, modes)


# ---- statistics -----------------------------------------------------------------------------------
def compute_stats(frames: dict[str, np.ndarray], features: dict[str, dict], images: bool = True) -> dict[str, dict]:
    """stats.json entries computed from in-memory frames (used by `select` and when stats.json is absent),
    merged episode by episode (runs of `episode_index`) as the recorder merges them, so quantiles mean the
    same everywhere: the frame-weighted mean of per-episode quantiles, as LeRobot aggregates them."""
    ids = frames.get("episode_index")
    bounds = np.flatnonzero(np.diff(ids)) + 1 if ids is not None else None  # where each episode starts
    stats = {}
    for key, values in frames.items():
        spec = features.get(key, {"shape": list(values.shape[1:]) or [1]})
        image = fmt.is_image(spec)
        if (image and not images) or values.dtype.kind not in "biuf" or not len(values):
            continue
        partial = None
        for part in np.split(values, bounds) if bounds is not None and len(values) == len(ids) else [values]:
            partial = fmt.merge_stats(partial, fmt.episode_stats(part, image=image))
        stats[key] = fmt.finish_stats(partial, spec["shape"], image=image)
    return stats


# lerobot/pusht as LeRobot records gym-pusht (its meta/info.json): a 96 x 96 camera stored as video under
# `observation.image`, the agent's 2-D position as the state, the 2-D target position as the action, 10 fps.
# Such a dataset records no labkit interface; it is gym-pusht's pixels + agent_pos observation.
GYM_PUSHT = {"observation.image": ("video", [96, 96, 3]), "observation.state": (None, [2]), "action": (None, [2])}
GYM_PUSHT_INTERFACE = {"env_id": "labkit/GymPushT-v0", "env_kwargs": {"obs_mode": "pixels"}}


def infer_interface(info: dict[str, Any]) -> dict | None:
    """The env interface of a dataset: the one info.json records (`fmt.interface_of`), else, for a dataset
    laid out as LeRobot records the canonical gym-pusht (`lerobot/pusht`), labkit's adapter of that env;
    None when neither (the caller must be told the interface)."""
    interface = fmt.interface_of(info)
    if interface is not None:
        return copy.deepcopy(interface)
    features = info.get("features") or {}
    observations = {k for k in features if k.startswith("observation.")}
    if info.get("fps") == 10 and observations == {"observation.image", "observation.state"} and all(
            k in features and list(features[k].get("shape", ())) == shape and dtype in (None, features[k].get("dtype"))
            for k, (dtype, shape) in GYM_PUSHT.items()):
        return copy.deepcopy(GYM_PUSHT_INTERFACE)
    return None


# ---- loading --------------------------------------------------------------------------------------
def load_dataset(root: str | Path, env_id: str | None = None) -> EpisodeDataset:
    """Load a LeRobotDataset v3 directory (recorded here or by LeRobot). With `env_id`, also check
    that its features fit that env's spaces (`check_compatible`).

    Every fault of the files is a DatasetError naming the file and the field: metadata of the wrong type
    or missing, paths that leave the dataset root, columns that do not have their declared shape, episode
    lengths that do not add up to the frames stored (checked before anything that size is allocated), and
    NaN or infinite values in numeric columns (which would make every training loss NaN)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"no dataset at {root}: the directory does not exist (record one with labkit.data.record)")
    info_path = root / fmt.INFO_PATH
    info = fmt.read_json(info_path)
    if not isinstance(info, dict):
        raise DatasetError(f"{info_path}: expected a JSON object at the top level, got a JSON {fmt._json_type(info)}")
    version = str(info.get("codebase_version", "?"))
    if not version.startswith("v3"):
        raise DatasetError(f"{info_path}: codebase_version {version} is not supported; labkit reads "
                           "LeRobotDataset v3 (convert older datasets with LeRobot's v2.1 -> v3.0 script)")
    fmt.check_info(info, info_path)
    if info.get("labkit") is None and fmt.interface_of(info) is not None:
        info["labkit"] = copy.deepcopy(fmt.interface_of(info))  # restored from the action feature's copy
    features: dict[str, dict] = info["features"]
    video_keys = [k for k, f in features.items() if f.get("dtype") == "video"]
    episodes, episodes_where = _read_episodes(root, video_keys)
    lengths = episodes["length"].astype(np.int64)

    # Frames: read each data file the episodes table points to; keep only committed episodes' rows.
    tables = []
    template = info.get("data_path") or fmt.DATA_PATH
    for chunk, file in dict.fromkeys(zip(episodes["data/chunk_index"].tolist(), episodes["data/file_index"].tolist(), strict=True)):
        path = fmt.path_in_root(root, template.format(chunk_index=chunk, file_index=file), "data_path", info_path)
        tables.append((path, fmt.read_parquet(path, "data file")))
    frames: dict[str, np.ndarray] = {}
    columns = [k for k, f in features.items() if f.get("dtype") not in ("video", "image", "string")]
    for key in columns:
        parts = []
        for path, table in tables:
            if key not in table.column_names:
                raise DatasetError(f"data file {path} has no column {key!r}, which meta/info.json lists as a feature")
            parts.append(_read_column(path, table, key, features[key], info_path))
        frames[key] = np.concatenate(parts)
    order = np.argsort(frames["index"], kind="stable")
    keep = order[np.isin(frames["episode_index"][order], episodes["episode_index"])]
    # The episode lengths must add up to the frames stored before anything is sized by them.
    # (each length is bounded first, so the sum cannot overflow)
    if len(lengths) and (lengths.min() < 0 or lengths.max() > len(keep) or int(lengths.sum()) != len(keep)):
        raise DatasetError(f"{episodes_where}: column 'length' (episode lengths {_short_list(lengths)}) does not "
                           f"add up to the {len(keep)} frames the data files hold for those episodes; the "
                           "dataset is corrupt")
    frames = {k: v[keep] for k, v in frames.items()}
    expected = np.repeat(episodes["episode_index"], lengths)
    if len(expected) != len(frames["episode_index"]) or not np.array_equal(expected, frames["episode_index"]):
        raise DatasetError(f"data files under {root / 'data'} do not match meta/episodes: expected "
                           f"{len(expected)} frames of episodes {episodes['episode_index'].tolist()}, "
                           f"found {len(frames['episode_index'])}; the dataset is corrupt")
    for key in video_keys:
        frames[key] = _load_video(root, info, key, episodes, lengths)
    for key in [k for k, f in features.items() if f.get("dtype") == "image"]:  # LeRobot's PNG-in-Parquet
        frames[key] = _load_images(tables, key)[keep]

    stats_path = root / fmt.STATS_PATH
    stats = _check_stats(fmt.read_json(stats_path), stats_path) if fmt.is_file(stats_path) else compute_stats(frames, features)
    tasks = _read_tasks(root)
    to = np.cumsum(lengths)
    if "success" not in episodes and "next.success" in frames and len(lengths) and lengths.min() > 0:
        # LeRobot's split/delete/merge tools drop labkit's success column; the frames still say it
        episodes["success"] = np.logical_or.reduceat(frames["next.success"].astype(bool), to - lengths)
    ds = EpisodeDataset(frames, to - lengths, to, info, stats, episodes, tasks, root)
    if env_id is not None:
        extra = info.get("labkit") or {}
        kwargs = extra.get("env_kwargs", {}) if extra.get("env_id") == env_id else {}
        if any(fmt.is_image(f) for f in features.values()) and "obs_mode" not in kwargs:
            kwargs = {**kwargs, "obs_mode": "pixels"}
        env = gym.make(env_id, **kwargs)
        try:
            check_compatible(ds, env)
        finally:
            env.close()
    return ds


def _short_list(values: np.ndarray, limit: int = 8) -> str:
    items = values[:limit].tolist()
    return str(items)[:-1] + (", ...]" if len(values) > limit else "]")


def _read_column(path: Path, table: Any, key: str, spec: dict, info_path: Path) -> np.ndarray:
    """One feature's column of a data file as [N, *shape], after checking that it holds the declared number
    of values per row (before reshaping) and, for a numeric feature, only finite numbers."""
    import pyarrow as pa

    column = table.column(key).combine_chunks()
    shape, size = list(spec["shape"]), math.prod(spec["shape"])
    declared = f"{info_path.name} declares features[{key!r}].shape {shape} ({size} values per frame)"
    if pa.types.is_fixed_size_list(column.type):
        if column.type.list_size != size:
            raise DatasetError(f"data file {path}: column {key!r} holds {column.type.list_size} values per row but {declared}")
        if column.null_count:
            raise DatasetError(f"data file {path}: column {key!r} has an empty (null) row")
    elif pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        sizes = pa.compute.list_value_length(column).fill_null(-1).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(sizes != size)
        if len(bad):
            row = int(bad[0])
            held = "no (null)" if sizes[row] < 0 else int(sizes[row])
            raise DatasetError(f"data file {path}: column {key!r} row {row} holds {held} values but {declared}")
    elif size != 1:
        raise DatasetError(f"data file {path}: column {key!r} holds one value per row but {declared}")
    values = fmt.from_arrow(column, shape)
    if spec["dtype"] in fmt.NUMERIC_DTYPES and values.dtype.kind not in "biuf":
        raise DatasetError(f"data file {path}: column {key!r} holds {column.type} values, not the numbers "
                           f"({spec['dtype']}) {info_path.name} declares (or it has empty cells)")
    if values.dtype.kind == "f":
        finite = np.isfinite(values)
        if not finite.all():
            row = int(np.argmax(~finite.reshape(len(values), -1).all(axis=1)))
            where = ""
            if "episode_index" in table.column_names and "frame_index" in table.column_names:
                where = (f" (episode {table.column('episode_index')[row].as_py()}, "
                         f"frame {table.column('frame_index')[row].as_py()})")
            raise DatasetError(f"data file {path}: column {key!r} has a non-finite value "
                               f"({values[row].ravel()[~finite[row].ravel()][0]}) at row {row}{where}; "
                               "NaN or inf in the data would make every training loss NaN: fix or drop "
                               "that episode and re-record")
    return values


def _check_stats(stats: Any, path: Path) -> dict[str, dict]:
    """stats.json: an object of feature -> {min, max, mean, std, ...} whose numbers are all finite."""
    if not isinstance(stats, dict) or not all(isinstance(v, dict) for v in stats.values()):
        raise DatasetError(f"{path}: expected a JSON object of feature name -> {{min, max, mean, std, count}}")
    for key, entry in stats.items():
        for name in ("min", "max", "mean", "std", *fmt.QUANTILES):
            if name not in entry:
                continue
            try:
                values = np.asarray(entry[name], dtype=np.float64)
            except (TypeError, ValueError) as e:
                raise DatasetError(f"{path}: {key}.{name} is not an array of numbers ({e})") from e
            if not np.isfinite(values).all():
                raise DatasetError(f"{path}: {key}.{name} has a non-finite value ({values[~np.isfinite(values)][0]}); "
                                   "normalising with it would make every training loss NaN")
    return stats


def _read_episodes(root: Path, video_keys: list[str] = ()) -> tuple[dict[str, np.ndarray], str]:
    """The episodes table (all its files, by episode_index) and a name for it in error messages."""
    import pyarrow as pa

    paths = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not paths:
        raise DatasetError(f"missing episodes table {root / fmt.EPISODES_PATH.format(chunk_index=0, file_index=0)}"
                           " (no episode was saved, or the dataset is not LeRobotDataset v3)")
    where = f"episodes table {paths[0]}" + (f" (+{len(paths) - 1} more files)" if len(paths) > 1 else "")
    try:
        table = pa.concat_tables([fmt.read_parquet(p, "episodes table") for p in paths], promote_options="permissive")
    except pa.ArrowException as e:
        raise DatasetError(f"{where}: its files do not share one schema ({e})") from e
    required = {"episode_index": "i", "length": "i", "data/chunk_index": "i", "data/file_index": "i"}
    for key in video_keys:
        required.update({f"videos/{key}/chunk_index": "i", f"videos/{key}/file_index": "i",
                         f"videos/{key}/from_timestamp": "f"})
    for name, kind in required.items():
        if name not in table.column_names:
            raise DatasetError(f"{where} has no column {name!r}")
        col = table.column(name)
        ok = pa.types.is_integer(col.type) if kind == "i" else (pa.types.is_floating(col.type) or pa.types.is_integer(col.type))
        if not ok or col.null_count:
            raise DatasetError(f"{where}: column {name!r} must hold {'integers' if kind == 'i' else 'numbers'} "
                               f"without gaps, got {col.type}{' with nulls' if col.null_count else ''}")
        if kind == "i" and name != "episode_index" and len(col) and pa.compute.min(col).as_py() < 0:
            raise DatasetError(f"{where}: column {name!r} has a negative value")
    table = table.sort_by("episode_index")
    out = {}
    for name in table.column_names:
        col = table.column(name)
        if name.startswith("stats/"):  # LeRobot's per-episode stats: not needed in memory
            continue
        if name == "tasks":  # a list of task strings per episode
            out[name] = np.empty(len(col), dtype=object)
            out[name][:] = col.to_pylist()
        else:
            out[name] = fmt.from_arrow(col)
    if "seed" in out and out["seed"].dtype == object:
        out["seed"] = np.array([-1 if s is None else s for s in out["seed"]], np.int64)
    for key in video_keys:
        ts = out[f"videos/{key}/from_timestamp"].astype(np.float64)
        if not (np.isfinite(ts) & (ts >= 0)).all():
            raise DatasetError(f"{where}: column 'videos/{key}/from_timestamp' must hold finite times >= 0")
    return out, where


def _read_tasks(root: Path) -> list[str]:
    path = root / fmt.TASKS_PATH
    if not path.is_file():
        return []
    table = fmt.read_parquet(path, "tasks table")
    name = next((c for c in ("task", "__index_level_0__") if c in table.column_names), None)
    if name is None:
        return []
    tasks = table.column(name).to_pylist()
    index = table.column("task_index").to_pylist() if "task_index" in table.column_names else range(len(tasks))
    return [t for _, t in sorted(zip(index, tasks, strict=True))]


def _load_images(tables: list, key: str) -> np.ndarray:
    """Decode an `image` feature (a struct of encoded bytes per row, as LeRobot stores them) to uint8."""
    import imageio.v3 as iio

    images = []
    for path, table in tables:
        if key not in table.column_names:
            raise DatasetError(f"data file {path} has no column {key!r}, which meta/info.json lists as a feature")
        for cell in table.column(key).to_pylist():
            data = cell.get("bytes") if isinstance(cell, dict) else cell
            if data is None:
                raise DatasetError(f"data file {path}: an image of {key!r} has no embedded bytes")
            images.append(iio.imread(data))
    return np.stack(images)


def _load_video(root: Path, info: dict, key: str, episodes: dict[str, np.ndarray], lengths: np.ndarray) -> np.ndarray:
    """Decode each video file once and cut every episode out of it by its from_timestamp."""
    fps = float(info["fps"])
    template = info.get("video_path") or fmt.VIDEO_PATH
    info_path = root / fmt.INFO_PATH
    shape = tuple(info["features"][key]["shape"])
    decoded: dict[Path, np.ndarray] = {}
    parts = []
    for e in range(len(lengths)):
        chunk, file = int(episodes[f"videos/{key}/chunk_index"][e]), int(episodes[f"videos/{key}/file_index"][e])
        path = fmt.path_in_root(root, template.format(video_key=key, chunk_index=chunk, file_index=file),
                                "video_path", info_path)
        if path not in decoded:
            decoded[path] = fmt.read_video(path)
            if decoded[path].shape[1:] != shape:
                raise DatasetError(f"video file {path} has frames of shape {decoded[path].shape[1:]} but "
                                   f"{info_path.name} declares features[{key!r}].shape {list(shape)}")
        start = int(round(float(episodes[f"videos/{key}/from_timestamp"][e]) * fps))
        clip = decoded[path][start:start + lengths[e]]
        if len(clip) != lengths[e]:
            raise DatasetError(f"video file {path} has {len(decoded[path])} frames, too few for episode "
                               f"{episodes['episode_index'][e]} (frames {start}..{start + lengths[e]}); it is truncated or corrupt")
        parts.append(clip)
    return np.concatenate(parts)


# ---- compatibility --------------------------------------------------------------------------------
def check_compatible(ds: EpisodeDataset, env: gym.Env | str) -> None:
    """Raise DatasetError unless the dataset's action and the observations it shares with `env` have the
    env's shapes. Observations the env does not produce (e.g. pixels for a state-only env) are not required."""
    own = isinstance(env, str)
    if own:
        env = gym.make(env)
    try:
        name = getattr(getattr(env, "spec", None), "id", None) or type(env).__name__
        camera = getattr(getattr(env, "unwrapped", env), "camera", "top") or "top"
        env_features = features_from_spaces(env.observation_space, env.action_space, ds.fps, camera)
    finally:
        if own:
            env.close()
    data_features = ds.info["features"]
    if "action" not in data_features:
        raise DatasetError(f"dataset at {ds.root} has no 'action' feature, so it cannot train a policy for {name}")
    shared = [k for k in env_features if k in data_features]
    if shared == ["action"]:
        raise DatasetError(f"dataset features {sorted(data_features)} share no observation with env {name} "
                           f"({sorted(k for k in env_features if k != 'action')})")
    for key in shared:
        have, want = tuple(data_features[key]["shape"]), tuple(env_features[key]["shape"])
        if have != want:
            raise DatasetError(f"feature {key!r}: the dataset has shape {have} but env {name} gives {want}; "
                               "record the dataset with this env (or its env kwargs) again")
