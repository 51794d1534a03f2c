"""Bounded, seeded fuzzing of a dataset's meta/info.json: whatever it says, `load_dataset` either loads the
dataset or raises DatasetError: never another exception, never a hang, never a gigabyte allocation.

Each case rewrites info.json of a tiny recorded dataset with 1-3 random mutations (field types, missing
keys, huge / negative / non-finite numbers, path templates that escape the root or abuse str.format,
feature names with '../') and loads it under a wall-clock alarm and tracemalloc.
"""

from __future__ import annotations

import copy
import json
import random
import resource
import shutil
import signal
import time
import tracemalloc
from collections import Counter

import numpy as np
import pytest

from labkit.data import DatasetError, Recorder, load_dataset

SEED = 20240607
STATE_CASES, VIDEO_CASES = 400, 60
SECONDS_PER_LOAD = 10  # a tiny dataset loads in milliseconds: anything near this is a hang
PEAK_BYTES = 100e6  # ... and allocates a few MB at most

NASTY = [None, True, False, 0, -1, 1, 3, 2**31, 2**63, -(2**63), 10**30, 1e308, -1e308, float("nan"),
         float("inf"), float("-inf"), -0.0, 0.5, "", "x", "10", "v3.0", "v2.1", [], [1], [-1], [0], [2], [3],
         [2**40, 2**40], [10**6] * 8, [1] * 9, [[1]], [1.5], ["3"], [None], {}, {"a": 1},
         {"dtype": "float32", "shape": [2]}, {"dtype": "video", "shape": [16, 16, 3]}]
PATHS = ["../outside/data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
         "{OUTSIDE}/data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
         "../outside/videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
         "{OUTSIDE}/videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
         "data/../../outside/data/chunk-000/file-000.parquet", "data/../data/chunk-000/file-000.parquet",
         "/etc/passwd", "/dev/zero", "/dev/urandom", "C:\\x.parquet", "\\\\server\\share\\x", "..", ".", "", "/",
         "data", "meta/info.json", "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
         "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4", "videos/{video_key}",
         "data/{chunk_index:0999999999d}.parquet", "data/{chunk_index:>999999999}.parquet",
         "{chunk_index.__class__.__mro__}", "{chunk_index!r}", "{0}", "{}", "{", "}", "{{}}", "{video_key[0]}",
         "{file_index:,}", "{file_index:e}", "{nope}", "videos/{video_key:03d}/{chunk_index}.mp4", "{file_index:s}", "data/chunk-{chunk_index}/file-{file_index}.parquet",
         "x" * 5000, "data/\x00.parquet"]
TOP_KEYS = ["codebase_version", "fps", "features", "data_path", "video_path", "labkit", "total_frames",
            "total_episodes", "total_tasks", "chunks_size", "splits", "robot_type"]
FEATURE_KEYS = ["dtype", "shape", "names", "info"]
DTYPES = ["float32", "float64", "int64", "int8", "uint8", "bool", "string", "video", "image", "object", "", "x"]
EVIL_NAMES = ["../x", "../../outside/videos/observation.images.top/chunk-000/file-000.mp4", "/abs", "",
              "observation.images.../..", "a" * 300]


def _nasty(rng: random.Random, outside: str):
    value = rng.choice(NASTY + PATHS)
    return value.replace("{OUTSIDE}", outside) if isinstance(value, str) else copy.deepcopy(value)


def mutate(info: dict, rng: random.Random, outside: str):
    """1-3 random mutations of a copy of `info` (a dict, or now and then something that is not one)."""
    info = copy.deepcopy(info)
    for _ in range(rng.randint(1, 3)):
        if not isinstance(info, dict):
            break
        features = info.get("features") if isinstance(info.get("features"), dict) else None
        op = rng.random()
        if op < 0.03:
            return _nasty(rng, outside)  # the whole document
        if op < 0.25:  # a top-level field set to anything
            info[rng.choice(TOP_KEYS)] = _nasty(rng, outside)
        elif op < 0.35:  # a top-level field removed
            info.pop(rng.choice(TOP_KEYS), None)
        elif op < 0.5:  # a path template
            info[rng.choice(["data_path", "video_path"])] = rng.choice(PATHS).replace("{OUTSIDE}", outside)
        elif features:
            key = rng.choice(sorted(features))
            spec = features[key]
            if op < 0.6:
                features[key] = _nasty(rng, outside)
            elif op < 0.65:
                del features[key]
            elif op < 0.7:  # renamed, to a name that is a path
                features[rng.choice(EVIL_NAMES)] = features.pop(key)
            elif not isinstance(spec, dict):
                continue
            elif op < 0.8:
                spec["shape"] = rng.choice([rng.choice(NASTY), [rng.choice([-(2**63), -1, 0, 1, 2, 3, 7, 96, 2**31,
                                                                            2**62, 10**20])
                                                                for _ in range(rng.randint(0, 4))]])
            elif op < 0.9:
                spec["dtype"] = rng.choice(DTYPES + [rng.choice(NASTY)])
            else:
                spec.pop(rng.choice(FEATURE_KEYS), None)
    return info


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"load_dataset ran past {SECONDS_PER_LOAD} s")


def fuzz(root, base: dict, cases: int, seed: int, outside: str) -> tuple[Counter, list[str], float, float]:
    """Load `cases` mutations of root's info.json; (outcome counts, failures, slowest load s, peak bytes)."""
    rng = random.Random(seed)
    path = root / "meta/info.json"
    outcomes: Counter = Counter()
    failures: list[str] = []
    slowest = peak_max = 0.0
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for case in range(cases):
            info = mutate(base, rng, outside)
            text = json.dumps(info)
            path.write_text(text)
            tracemalloc.start()
            start = time.perf_counter()
            signal.alarm(SECONDS_PER_LOAD)
            try:
                ds = load_dataset(root)
                assert np.isfinite(ds.fps) and ds.fps > 0 and len(ds) >= 0
                outcomes["loaded"] += 1
            except DatasetError:
                outcomes["DatasetError"] += 1
            except Exception as e:  # noqa: BLE001 - any other type is the failure being looked for
                outcomes[type(e).__name__] += 1
                failures.append(f"case {case}: {type(e).__name__}: {str(e)[:200]}\n  info.json: {text[:400]}")
            finally:
                signal.alarm(0)
                elapsed = time.perf_counter() - start
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
            slowest, peak_max = max(slowest, elapsed), max(peak_max, peak)
            if peak > PEAK_BYTES:
                failures.append(f"case {case}: {peak / 1e6:.0f} MB allocated\n  info.json: {text[:400]}")
    finally:
        signal.signal(signal.SIGALRM, previous)
    return outcomes, failures, slowest, peak_max


def _record(root, pixels: bool, episodes: int, frames: int):
    with Recorder(root, fps=10) as rec:
        for e in range(episodes):
            for t in range(frames):
                obs = {"state": np.full(3, e + t, np.float32), "proprio": np.full(2, t, np.float32)}
                if pixels:
                    obs["pixels"] = np.full((16, 16, 3), 30 * t, np.uint8)
                rec.add_frame(obs, [0.1 * t, -0.1 * t], reward=float(t), done=t == frames - 1)
            rec.save_episode(seed=e)
    return root


@pytest.mark.parametrize("pixels, cases", [(False, STATE_CASES), (True, VIDEO_CASES)], ids=["state", "video"])
def test_fuzz_info_json(tmp_path, pixels, cases):
    root = _record(tmp_path / "ds", pixels, episodes=3 if not pixels else 1, frames=5)
    shutil.copytree(root, tmp_path / "outside")  # a loadable dataset next to it: escaping paths would work
    base = json.loads((root / "meta/info.json").read_text())
    load_dataset(root)  # unmutated, it loads
    start, rss = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcomes, failures, slowest, peak = fuzz(root, base, cases, SEED + pixels, str(tmp_path / "outside"))
    seconds = time.perf_counter() - start
    # tracemalloc sees numpy and Python, not Arrow's allocator: the process's peak RSS bounds the rest
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) * 1024  # KiB on Linux
    print(f"\nfuzz info.json ({'video' if pixels else 'state'}): {cases} cases in {seconds:.1f} s, "
          f"outcomes {dict(outcomes)}, slowest load {slowest * 1e3:.0f} ms, peak {peak / 1e6:.1f} MB traced, "
          f"max RSS +{rss_growth / 1e6:.0f} MB")
    assert rss_growth < 1e9, f"the process grew by {rss_growth / 1e9:.1f} GB while fuzzing"
    assert not failures, f"{len(failures)} of {cases} cases failed:\n" + "\n".join(failures[:10])
    assert outcomes["DatasetError"] > cases // 4 and outcomes["loaded"] > 0  # the mutations bite, and not all
