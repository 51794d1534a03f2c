"""The LeRobotDataset v3 layout on disk: paths, atomic writes, Parquet/MP4 helpers and statistics.

Everything that knows file names lives here, so the recorder and the loader agree by construction:

    meta/info.json                                   schema, fps, totals, path templates (+ "labkit" extra)
    meta/stats.json                                  min/max/mean/std/count/q01..q99 per feature
    meta/tasks.parquet                               task string -> task_index
    meta/episodes/chunk-000/file-000.parquet         one row per episode: lengths, offsets, video spans, stats/*
    data/chunk-{c:03d}/file-{f:03d}.parquet          one row per frame
    videos/{video_key}/chunk-{c:03d}/file-{f:03d}.mp4  camera streams, episodes concatenated
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import string
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE = 1000  # files per chunk directory, as LeRobot
DATA_FILES_SIZE_IN_MB = 100  # a data file rolls over to the next one past this size
VIDEO_FILES_SIZE_IN_MB = 200  # a consolidated video file rolls over past this size
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
INFO_PATH, STATS_PATH, TASKS_PATH = "meta/info.json", "meta/stats.json", "meta/tasks.parquet"
VIDEO_CODEC, PIX_FMT, CRF = "libx264", "yuv420p", 18

# The frame bookkeeping columns every LeRobot v3 dataset has, plus the RL ones labkit records.
INDEX_FEATURES: dict[str, dict[str, Any]] = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
NEXT_FEATURES: dict[str, dict[str, Any]] = {
    "next.reward": {"dtype": "float32", "shape": [1], "names": None},
    "next.done": {"dtype": "bool", "shape": [1], "names": None},
    "next.success": {"dtype": "bool", "shape": [1], "names": None},
}


# The env interface a dataset was recorded with ({"env_id", "env_kwargs"}: PushT's frame="block" or
# actions="relative" change what the numbers mean) is stored twice in info.json: as the top-level "labkit"
# field, and as a copy inside the "action" feature. LeRobot's split/delete/merge tools rebuild info.json
# from scratch, dropping unknown top-level fields, but copy `features` verbatim (0.4.4:
# lerobot/datasets/dataset_tools.py, LeRobotDatasetMetadata.create(features=dataset.meta.features);
# aggregate.py keeps the first dataset's features and refuses datasets whose features differ), so the
# copy survives them, and merging datasets recorded with different interfaces fails there.
INTERFACE_FIELD = "labkit"


def with_interface(features: dict[str, dict], interface: dict | None) -> dict[str, dict]:
    """`features` with the env interface copied into the action feature (see INTERFACE_FIELD)."""
    if interface is None or "action" not in features:
        return features
    return {**features, "action": {**features["action"], INTERFACE_FIELD: interface}}


def interface_of(info: dict[str, Any]) -> dict | None:
    """The env interface info.json records: its "labkit" field, else the copy in the action feature
    (all that is left after LeRobot's tools), else None (a dataset recorded elsewhere, or stripped)."""
    if info.get(INTERFACE_FIELD) is not None:
        return info[INTERFACE_FIELD]
    action = (info.get("features") or {}).get("action")
    return action.get(INTERFACE_FIELD) if isinstance(action, dict) else None


class DatasetError(ValueError):
    """A dataset that is missing, corrupt, or does not fit the env it is used with; the message says which."""


def chunk_file(n: int) -> tuple[int, int]:
    """The (chunk_index, file_index) of the n-th file of a kind: CHUNKS_SIZE files per chunk directory."""
    return divmod(n, CHUNKS_SIZE)


def is_image(feature: dict[str, Any]) -> bool:
    return feature.get("dtype") in ("video", "image")


# ---- validating meta/info.json: every field the loader uses, checked before anything is allocated ------
# LeRobot's feature dtypes that hold numbers: their Parquet columns must be numeric (and, if float, finite).
NUMERIC_DTYPES = frozenset({"bool", "float16", "float32", "float64", "int8", "int16", "int32", "int64",
                            "uint8", "uint16", "uint32", "uint64"})
MAX_FEATURE_NDIM = 8
MAX_FEATURE_SIZE = 1 << 32  # values per frame: far above any real feature, far below an absurd declaration
# The fields a path template may use, and the format specs allowed on them ("", "d", "03d", ...): no
# attribute access, no conversions, no widths that would build a gigabyte-long file name.
_TEMPLATE_FIELDS = {"data_path": ("chunk_index", "file_index"),
                    "video_path": ("video_key", "chunk_index", "file_index")}
_TEMPLATE_SPEC = re.compile(r"0?\d{0,2}d?")


def check_info(info: Any, path: Path) -> dict[str, Any]:
    """Raise DatasetError, naming `path` (meta/info.json) and the field, unless `info` has what the loader
    uses: a JSON object; `fps` a positive finite number; `features` an object of {dtype: str, shape: [n, ...]}
    (0 < n, at most MAX_FEATURE_NDIM dims and MAX_FEATURE_SIZE values) with integer `index` and
    `episode_index`; `data_path` / `video_path` None or a template of their fields only; `labkit` None or
    an object. Returns `info`."""
    if not isinstance(info, dict):
        raise DatasetError(f"{path}: expected a JSON object at the top level, got a JSON {_json_type(info)}")
    if "fps" not in info:
        raise DatasetError(f"{path}: field 'fps' is missing (the dataset's frames per second)")
    fps = info["fps"]
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise DatasetError(f"{path}: field 'fps' must be a positive number of frames per second, got {fps!r}")
    if "features" not in info:
        raise DatasetError(f"{path}: field 'features' is missing (the schema of the dataset's columns)")
    features = info["features"]
    if not isinstance(features, dict) or not features:
        raise DatasetError(f"{path}: field 'features' must be a non-empty JSON object of feature name -> "
                           f"{{dtype, shape}}, got {_json_type(features)} {_short(features)}")
    for key, spec in features.items():
        where = f"{path}: features[{key!r}]"
        if not isinstance(spec, dict):
            raise DatasetError(f"{where} must be a JSON object with 'dtype' and 'shape', got {_json_type(spec)}")
        if not isinstance(spec.get("dtype"), str):
            raise DatasetError(f"{where}.dtype must be a string such as 'float32' or 'video', got "
                               f"{_short(spec.get('dtype'))}")
        shape = spec.get("shape")
        if (not isinstance(shape, list) or len(shape) > MAX_FEATURE_NDIM
                or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape)):
            raise DatasetError(f"{where}.shape must be a list of at most {MAX_FEATURE_NDIM} positive integers, "
                               f"got {_short(shape)}")
        if math.prod(shape) > MAX_FEATURE_SIZE:
            raise DatasetError(f"{where}.shape {_short(shape)} declares {math.prod(shape)} values per frame, "
                               f"more than the {MAX_FEATURE_SIZE} any real feature has")
        if is_image(spec) and len(shape) != 3:
            raise DatasetError(f"{where}.shape must be [height, width, channels] for dtype {spec['dtype']!r}, got {shape}")
    for key in ("index", "episode_index"):
        if key not in features:
            raise DatasetError(f"{path}: features has no {key!r}, which every LeRobotDataset v3 has")
        if not str(features[key]["dtype"]).startswith(("int", "uint")) or math.prod(features[key]["shape"]) != 1:
            raise DatasetError(f"{path}: features[{key!r}] must be an integer scalar (dtype int64, shape [1]), "
                               f"got {features[key]['dtype']} {features[key]['shape']}")
    for field in _TEMPLATE_FIELDS:
        if info.get(field) is not None:
            check_template(info[field], field, path)
    for field, extra in (("'labkit'", info.get("labkit")), ("features['action'].labkit",
                                                          features.get("action", {}).get(INTERFACE_FIELD))):
        if extra is not None and not (isinstance(extra, dict) and isinstance(extra.get("env_kwargs", {}), dict)
                                      and isinstance(extra.get("env_id"), (str, type(None)))):
            raise DatasetError(f"{path}: field {field} must be an object {{env_id: str, env_kwargs: {{...}}}}, "
                               f"got {_short(extra)}")
    return info


def check_template(template: Any, field: str, path: Path) -> str:
    """A path template of meta/info.json (`data_path`, `video_path`): a relative path string whose
    {fields} are only those LeRobot defines for it, with plain integer format specs."""
    if not isinstance(template, str):
        raise DatasetError(f"{path}: field {field!r} must be a path template string, got {_short(template)}")
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise DatasetError(f"{path}: field {field!r} = {template!r} is not a valid path template ({e})") from e
    allowed = _TEMPLATE_FIELDS[field]
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        spec_ok = not spec if name == "video_key" else _TEMPLATE_SPEC.fullmatch(spec or "")  # a str: no spec
        if name not in allowed or conversion or not spec_ok:
            raise DatasetError(f"{path}: field {field!r} = {template!r} may only use "
                               f"{', '.join('{' + a + '}' for a in allowed)} (with a spec such as :03d)")
    if os.path.isabs(template) or template.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", template):
        raise DatasetError(f"{path}: field {field!r} = {template!r} is an absolute path; paths in "
                           "meta/info.json are relative to the dataset root")
    return template


def path_in_root(root: Path, relative: str, field: str, path: Path) -> Path:
    """`relative` (a formatted path template) resolved against the dataset `root`, refusing one that leaves
    it ('..', an absolute path). The check is lexical and the normalised path is the one opened, so
    '../' can never climb out; symlinks inside the dataset are followed as usual (the Hugging Face hub
    cache stores every dataset file as a symlink into its blob store)."""
    base = os.path.abspath(root)
    full = os.path.normpath(os.path.join(base, relative))
    if full == base:
        raise DatasetError(f"{path}: field {field!r} gives {relative!r}, the dataset root itself, not a file in it")
    if os.path.isabs(relative) or os.path.commonpath([base, full]) != base:
        raise DatasetError(f"{path}: field {field!r} gives {relative!r}, which points outside the dataset "
                           f"root {root}; paths in meta/info.json must stay inside the dataset")
    return Path(full)


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ---- atomic writes: a file is either the old version or the new one, never half written -------------
def _replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    _replace(tmp, path)


def write_parquet(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    _replace(tmp, path)


def is_file(path: Path) -> bool:
    """Whether `path` is a file, raising DatasetError for a path that cannot even be looked up (a name
    too long for the file system, a NUL byte: what a corrupt info.json template can produce)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot open {_short(str(path), 200)}: {e}") from e


def read_json(path: Path) -> Any:
    if not is_file(path):
        raise DatasetError(f"missing file {path}: a LeRobotDataset v3 directory needs it")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path} is corrupt (not valid JSON: {e}); re-record or restore it") from e


def read_parquet(path: Path, what: str = "file") -> pa.Table:
    """Read a Parquet file, turning a missing or unreadable one into a DatasetError that names it."""
    if not is_file(path):
        raise DatasetError(f"missing {what} {path}")
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{what} {path} is corrupt or unreadable as Parquet ({e})") from e


# ---- frame columns <-> numpy ---------------------------------------------------------------------
def to_arrow(values: np.ndarray) -> pa.Array:
    """[N] -> a plain column; [N, D] -> a fixed-size list column, as LeRobot stores vectors."""
    if values.ndim == 1:
        return pa.array(values)
    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, int(np.prod(values.shape[1:])))


def from_arrow(column: pa.ChunkedArray | pa.Array, shape: Iterable[int] | None = None) -> np.ndarray:
    """A Parquet column back to numpy: scalars -> [N], (fixed-size) lists -> [N, *shape]."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        n = len(arr)
        flat = arr.flatten().to_numpy(zero_copy_only=False)
        tail = tuple(shape) if shape else (len(flat) // max(n, 1),)
        return flat.reshape(n, *tail)
    return arr.to_numpy(zero_copy_only=False)


# ---- statistics: merged episode by episode, so recording never re-reads what it wrote ------------
# The quantiles LeRobot writes (lerobot/datasets/compute_stats.py, DEFAULT_QUANTILES, keys "q01".."q99"):
# its QUANTILES normalisation (pi0.5's default) refuses a dataset whose stats lack q01 and q99.
QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
STAT_NAMES = ("min", "max", "mean", "std", "count", *QUANTILES)  # one stats.json entry, in LeRobot's order


_Q = np.array(list(QUANTILES.values()))


def _sorted_quantiles(x: np.ndarray) -> np.ndarray:
    """np.quantile(x, _Q, axis=0) (its "linear" method, bit for bit: the same indices and the same lerp),
    from one sort: 3-6x faster on an episode, where np.quantile's own set-up dominates."""
    s = np.sort(x, axis=0)
    v = (len(x) - 1) * _Q
    lo = np.floor(v)
    hi = np.minimum(lo + 1, len(x) - 1)
    g = (v - lo)[:, None]
    a, b = s[lo.astype(np.intp)], s[hi.astype(np.intp)]
    d = b - a
    return np.where(g >= 0.5, b - d * (1 - g), a + d * g)  # numpy's _lerp: from the nearer end


def _quantiles(x: np.ndarray, image: bool) -> dict[str, np.ndarray]:
    """Per-column quantiles of x [n, d]. Images are uint8, so one 256-bin count per channel gives the
    same values as np.quantile over every pixel (linear interpolation), without sorting millions of them."""
    if not image:
        q = _sorted_quantiles(x) if len(x) and not np.isnan(x).any() else np.quantile(x, _Q, axis=0)
        return {name: q[i] for i, name in enumerate(QUANTILES)}
    out = {name: np.empty(x.shape[1]) for name in QUANTILES}
    for c in range(x.shape[1]):
        cdf = np.cumsum(np.bincount(x[:, c], minlength=256))
        for name, q in QUANTILES.items():
            pos = q * (len(x) - 1)  # np.quantile's "linear" method: between sorted values floor(pos) and ceil(pos)
            lo, hi = np.searchsorted(cdf, [math.floor(pos), math.ceil(pos)], side="right")
            out[name][c] = (lo + (pos - math.floor(pos)) * (hi - lo)) / 255.0
    return out


def episode_stats(values: np.ndarray, image: bool = False) -> dict[str, np.ndarray]:
    """min/max/mean/M2/count and quantiles of one episode's feature; images are per channel, scaled to [0, 1]."""
    if image:  # [L, H, W, C] uint8 -> per channel over all pixels of all frames
        pixels = values.reshape(-1, values.shape[-1])
        x = pixels.astype(np.float64) / 255.0
    else:
        x = values.reshape(len(values), -1).astype(np.float64)
    mean = x.mean(axis=0)
    # n counts the values averaged (pixels for images); count is the number of frames, as LeRobot.
    return {"min": x.min(axis=0), "max": x.max(axis=0), "mean": mean,
            "m2": ((x - mean) ** 2).sum(axis=0), "n": np.float64(len(x)), "count": np.int64(len(values)),
            **_quantiles(pixels if image else x, image)}


def merge_stats(a: dict[str, np.ndarray] | None, b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Combine two partial statistics: min/max/mean/variance exactly (Chan et al.'s parallel update);
    quantiles, which cannot be merged exactly, as their frame-count-weighted mean, the way LeRobot's
    aggregate_stats combines episodes (so its split/merge tools recompute the same numbers)."""
    if a is None:
        return b
    n = a["n"] + b["n"]
    delta = b["mean"] - a["mean"]
    count = a["count"] + b["count"]
    out = {"min": np.minimum(a["min"], b["min"]), "max": np.maximum(a["max"], b["max"]),
           "mean": a["mean"] + delta * b["n"] / n, "m2": a["m2"] + b["m2"] + delta**2 * a["n"] * b["n"] / n,
           "n": n, "count": count}
    for name in QUANTILES:
        if name in a and name in b:
            out[name] = (a[name] * a["count"] + b[name] * b["count"]) / count
    return out


def finish_stats(s: dict[str, np.ndarray], shape: list[int], image: bool = False) -> dict[str, list]:
    """Partial statistics -> the stats.json entry: feature-shaped lists ([C, 1, 1] for images)."""
    out_shape = [shape[-1], 1, 1] if image else shape
    entry = {k: np.asarray(s[k]).reshape(out_shape).tolist() for k in ("min", "max", "mean")}
    entry["std"] = np.sqrt(np.maximum(s["m2"] / s["n"], 0.0)).reshape(out_shape).tolist()
    entry["count"] = [int(s["count"])]
    entry.update({k: np.asarray(s[k]).reshape(out_shape).tolist() for k in QUANTILES if k in s})
    return entry


def stats_columns(entries: dict[str, dict[str, list]]) -> dict[str, list]:
    """One episode's stats.json-style entries as the episodes table's `stats/<feature>/<stat>` cells,
    the flattened form LeRobot writes (lerobot_dataset.py: flatten_dict({"stats": episode_stats}))
    and reads back in its split/delete/merge tools to recompute stats.json."""
    return {f"stats/{key}/{name}": value for key, entry in entries.items() for name, value in entry.items()}


# ---- video: one MP4 per episode while recording, concatenated by stream copy at the end --------
def write_video(path: Path, frames: np.ndarray, fps: float) -> None:
    """Encode uint8 [L, H, W, 3] frames as H.264 / yuv420p with imageio-ffmpeg, atomically."""
    import imageio_ffmpeg

    length, h, w, c = frames.shape
    if c != 3 or h % 2 or w % 2:
        raise DatasetError(f"video frames must be [L, H, W, 3] with even H and W (yuv420p), got {frames.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.mp4")
    # No B-frames: every packet's decode order is its display order, so concatenation by stream copy
    # keeps each episode at exactly from_timestamp * fps frames into the file.
    writer = imageio_ffmpeg.write_frames(
        str(tmp), (w, h), fps=fps, codec=VIDEO_CODEC, pix_fmt_out=PIX_FMT, quality=None,
        macro_block_size=2, output_params=["-crf", str(CRF), "-bf", "0", "-preset", "fast"])
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    _replace(tmp, path)


def concat_videos(sources: list[Path], path: Path) -> None:
    """Join MP4 files of identical encoding into one, by stream copy (no re-encoding), atomically."""
    import imageio_ffmpeg

    tmp = path.with_name(f".{path.stem}.tmp.mp4")
    listing = path.with_name(f".{path.stem}.concat.txt")
    listing.write_text("".join(f"file '{p.resolve()}'\n" for p in sources))
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "concat", "-safe", "0",
           "-i", str(listing), "-c", "copy", "-f", "mp4", str(tmp)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    listing.unlink(missing_ok=True)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise DatasetError(f"could not concatenate videos into {path}: {result.stderr.strip()}")
    _replace(tmp, path)


def read_video(path: Path) -> np.ndarray:
    """Decode a whole MP4 into uint8 [F, H, W, 3]."""
    import imageio_ffmpeg

    if not is_file(path):
        raise DatasetError(f"missing video file {path}")
    try:
        gen = imageio_ffmpeg.read_frames(str(path))
        meta = next(gen)
        w, h = meta["size"]
        frames = [np.frombuffer(b, np.uint8).reshape(h, w, 3) for b in gen]
    except (RuntimeError, OSError, StopIteration, ValueError) as e:
        raise DatasetError(f"video file {path} is corrupt or unreadable ({e})") from e
    return np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8)
