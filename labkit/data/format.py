"""The LeRobotDataset v3 layout on disk: paths, atomic writes, Parquet/MP4 helpers and statistics.

Everything that knows file names lives here, so the recorder and the loader agree by construction:

    meta/info.json                                   schema, fps, totals, path templates (+ "labkit" extra)
    meta/stats.json                                  min/max/mean/std/count per feature
    meta/tasks.parquet                               task string -> task_index
    meta/episodes/chunk-000/file-000.parquet         one row per episode: lengths, offsets, video spans
    data/chunk-{c:03d}/file-{f:03d}.parquet          one row per frame
    videos/{video_key}/chunk-{c:03d}/file-{f:03d}.mp4  camera streams, episodes concatenated
"""

from __future__ import annotations

import json
import os
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


class DatasetError(ValueError):
    """A dataset that is missing, corrupt, or does not fit the env it is used with; the message says which."""


def chunk_file(n: int) -> tuple[int, int]:
    """The (chunk_index, file_index) of the n-th file of a kind: CHUNKS_SIZE files per chunk directory."""
    return divmod(n, CHUNKS_SIZE)


def is_image(feature: dict[str, Any]) -> bool:
    return feature.get("dtype") in ("video", "image")


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


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise DatasetError(f"missing file {path}: a LeRobotDataset v3 directory needs it")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path} is corrupt (not valid JSON: {e}); re-record or restore it") from e


def read_parquet(path: Path, what: str = "file") -> pa.Table:
    """Read a Parquet file, turning a missing or unreadable one into a DatasetError that names it."""
    if not path.is_file():
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
def episode_stats(values: np.ndarray, image: bool = False) -> dict[str, np.ndarray]:
    """min/max/mean/M2/count of one episode's feature; images are per channel, scaled to [0, 1]."""
    if image:  # [L, H, W, C] uint8 -> per channel over all pixels of all frames
        x = values.reshape(-1, values.shape[-1]).astype(np.float64) / 255.0
    else:
        x = values.reshape(len(values), -1).astype(np.float64)
    mean = x.mean(axis=0)
    # n counts the values averaged (pixels for images); count is the number of frames, as LeRobot.
    return {"min": x.min(axis=0), "max": x.max(axis=0), "mean": mean,
            "m2": ((x - mean) ** 2).sum(axis=0), "n": np.float64(len(x)), "count": np.int64(len(values))}


def merge_stats(a: dict[str, np.ndarray] | None, b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Combine two partial statistics exactly (Chan et al.'s parallel mean/variance update)."""
    if a is None:
        return b
    n = a["n"] + b["n"]
    delta = b["mean"] - a["mean"]
    return {"min": np.minimum(a["min"], b["min"]), "max": np.maximum(a["max"], b["max"]),
            "mean": a["mean"] + delta * b["n"] / n, "m2": a["m2"] + b["m2"] + delta**2 * a["n"] * b["n"] / n,
            "n": n, "count": a["count"] + b["count"]}


def finish_stats(s: dict[str, np.ndarray], shape: list[int], image: bool = False) -> dict[str, list]:
    """Partial statistics -> the stats.json entry: feature-shaped lists ([C, 1, 1] for images)."""
    out_shape = [shape[-1], 1, 1] if image else shape
    entry = {k: np.asarray(s[k]).reshape(out_shape).tolist() for k in ("min", "max", "mean")}
    entry["std"] = np.sqrt(np.maximum(s["m2"] / s["n"], 0.0)).reshape(out_shape).tolist()
    entry["count"] = [int(s["count"])]
    return entry


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

    if not path.is_file():
        raise DatasetError(f"missing video file {path}")
    try:
        gen = imageio_ffmpeg.read_frames(str(path))
        meta = next(gen)
        w, h = meta["size"]
        frames = [np.frombuffer(b, np.uint8).reshape(h, w, 3) for b in gen]
    except (RuntimeError, OSError, StopIteration, ValueError) as e:
        raise DatasetError(f"video file {path} is corrupt or unreadable ({e})") from e
    return np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8)
