"""The LeRobot round trip, both ways, on every shipped dataset (`make interop`).

Two halves, one per virtual environment (LeRobot pins another torch, so it lives in .venv-lerobot):

    .venv-lerobot/bin/python tools/interop.py lerobot OUT   # LeRobot reads labkit's datasets, runs its
                                                           # split/delete tools, writes one with its create API
    .venv/bin/python tools/interop.py labkit OUT            # labkit compares, reads LeRobot's, prints the table

The LeRobot half records what LeRobot read (frame counts, episode bounds, every tabular column, a few video
frames per camera) in OUT/<name>.npz; the labkit half loads the same files with labkit's loader and
compares. Videos: LeRobot 0.4.4 decodes with torchcodec (needs system FFmpeg libraries) or through
torchvision's VideoReader (gone from torchvision 0.28, the one that fits torch 2.13), so frames are decoded
here with PyAV at the timestamps LeRobot's own dataset computes (LeRobotDataset._query_videos' inputs).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT / "datasets"
SPLIT_DATASET = "pusht_block_rel"  # the one whose interface (block frame, relative actions) must survive
VIDEO_SAMPLES = 4  # frames compared per camera and dataset (first, last and two between)


def shipped() -> list[str]:
    return sorted(p.name for p in DATASETS.iterdir() if (p / "meta" / "info.json").is_file())


# ---- the LeRobot half ---------------------------------------------------------------------------------
def _pyav_frames(path: Path, timestamps: list[float]) -> np.ndarray:
    """uint8 [N, H, W, 3] frames of `path` nearest to `timestamps` (seconds), decoded with PyAV."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = [(float(f.pts * stream.time_base), f.to_ndarray(format="rgb24")) for f in container.decode(stream)]
    times = np.array([t for t, _ in decoded])
    return np.stack([decoded[int(np.argmin(np.abs(times - t)))][1] for t in timestamps])


def _quantiles_normalise(meta, actions: np.ndarray) -> bool:
    """Whether LeRobot's QUANTILES normalisation (pi0.5's default; it raises "requires q01 and q99 stats"
    without them) accepts the dataset's stats and maps its actions to finite numbers."""
    import torch
    from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
    from lerobot.processor.normalize_processor import NormalizerProcessorStep

    step = NormalizerProcessorStep(features={"action": PolicyFeature(FeatureType.ACTION, actions.shape[1:])},
                                   norm_map={FeatureType.ACTION: NormalizationMode.QUANTILES}, stats=meta.stats)
    return bool(torch.isfinite(step._normalize_action(torch.as_tensor(actions), inverse=False)).all())


def lerobot_half(out: Path) -> None:
    # torchvision 0.28's PyPI wheel is built for CUDA torch; with the CPU torch its compiled ops are
    # missing and registering their meta kernels fails on import. LeRobot's dataset code needs none of them.
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import lerobot
    from lerobot.datasets.dataset_tools import delete_episodes, split_dataset
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    out.mkdir(parents=True, exist_ok=True)
    version = getattr(lerobot, "__version__", None)
    if version is None:
        from importlib.metadata import version as _v
        version = _v("lerobot")
    summary = {"lerobot": version, "datasets": {}}
    for name in shipped():
        ds = LeRobotDataset(f"labkit/{name}", root=DATASETS / name, video_backend="pyav")
        meta = ds.meta
        record = {"frames": ds.num_frames, "episodes": ds.num_episodes,
                  "from": [int(e["dataset_from_index"]) for e in meta.episodes],
                  "to": [int(e["dataset_to_index"]) for e in meta.episodes]}
        arrays = {}
        table = ds.hf_dataset.with_format("numpy")
        for key, feature in meta.features.items():
            if feature["dtype"] in ("video", "image", "string"):
                continue
            arrays[f"col/{key}"] = np.asarray(table[key]).reshape(ds.num_frames, -1)
        record["quantiles"] = _quantiles_normalise(meta, arrays["col/action"])
        for key in meta.video_keys:  # a few frames per camera, where LeRobot's metadata locates them
            picks = np.linspace(0, ds.num_frames - 1, VIDEO_SAMPLES).round().astype(int)
            frames = []
            for i in picks:
                ep = int(arrays["col/episode_index"][i, 0])
                row = meta.episodes[ep]
                ts = row[f"videos/{key}/from_timestamp"] + float(arrays["col/timestamp"][i, 0])
                path = ds.root / meta.get_video_file_path(ep, key)
                frames.append(_pyav_frames(path, [ts])[0])
            arrays[f"video/{key}"] = np.stack(frames)
            arrays[f"videoidx/{key}"] = picks
        np.savez_compressed(out / f"{name}.npz", **arrays)
        summary["datasets"][name] = record
        print(f"lerobot read {name}: {ds.num_frames} frames, {ds.num_episodes} episodes", flush=True)

    # LeRobot's dataset tools on one dataset: split it, delete from it.
    source = LeRobotDataset(f"labkit/{SPLIT_DATASET}", root=DATASETS / SPLIT_DATASET, video_backend="pyav")
    n = source.num_episodes
    split_dataset(source, {"train": list(range(0, n - 10)), "val": list(range(n - 10, n))}, output_dir=out / "split")
    delete_episodes(source, list(range(0, n, 2)), output_dir=out / "deleted", repo_id="labkit/deleted")
    summary["tools"] = {"split_val": list(range(n - 10, n)), "deleted": list(range(0, n, 2))}

    # A dataset written by LeRobot's create API: state, action and a video camera, two episodes.
    rng = np.random.default_rng(0)
    features = {"observation.state": {"dtype": "float32", "shape": (3,), "names": None},
                "action": {"dtype": "float32", "shape": (2,), "names": None},
                "observation.images.top": {"dtype": "video", "shape": (32, 32, 3),
                                           "names": ["height", "width", "channels"]}}
    created = LeRobotDataset.create("lerobot/made_here", fps=10, features=features, root=out / "created",
                                    use_videos=True, video_backend="pyav")
    written = {"observation.state": [], "action": []}
    for length in (7, 5):
        for _ in range(length):
            frame = {"observation.state": rng.normal(size=3).astype(np.float32),
                     "action": rng.normal(size=2).astype(np.float32),
                     "observation.images.top": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "task": "wave"}
            created.add_frame(frame)
            written["observation.state"].append(frame["observation.state"])
            written["action"].append(frame["action"])
        created.save_episode()
    created.finalize()
    np.savez_compressed(out / "created.npz", **{k: np.stack(v) for k, v in written.items()})
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


# ---- the labkit half ----------------------------------------------------------------------------------
def labkit_half(out: Path) -> int:
    from labkit.data import load_dataset

    summary = json.loads((out / "summary.json").read_text())
    rows, failures = [], 0
    for name, record in summary["datasets"].items():
        ds = load_dataset(DATASETS / name)
        arrays = np.load(out / f"{name}.npz")
        counts = record["frames"] == len(ds) and record["episodes"] == ds.num_episodes
        bounds = record["from"] == ds.episode_from.tolist() and record["to"] == ds.episode_to.tolist()
        columns = [k[4:] for k in arrays.files if k.startswith("col/")]
        values = all(np.array_equal(arrays[f"col/{k}"], ds.frames[k].reshape(len(ds), -1)) for k in columns)
        cams = [k[6:] for k in arrays.files if k.startswith("video/")]
        # the same decoder (FFmpeg) on the same file: equal, or off by a rounding step of the colour conversion
        diff = max((int(np.abs(arrays[f"video/{k}"].astype(int) - ds.frames[k][arrays[f"videoidx/{k}"]]).max())
                    for k in cams), default=0)
        video = diff <= 2
        ok = counts and bounds and values and video and record["quantiles"]
        failures += not ok
        rows.append((name, f"{len(ds)} / {ds.num_episodes}", _mark(counts and bounds), f"{_mark(values)} ({len(columns)})",
                     f"{_mark(video)} ({len(cams)}, max diff {diff})" if cams else "-", _mark(record["quantiles"])))

    # LeRobot's tools: the split and the deletion load in labkit with the interface and the right frames.
    source = load_dataset(DATASETS / SPLIT_DATASET)
    tools = []
    for label, folder, kept in (("split (val)", out / "split" / "val", summary["tools"]["split_val"]),
                                ("delete", out / "deleted",
                                 sorted(set(range(source.num_episodes)) - set(summary["tools"]["deleted"])))):
        ds = load_dataset(folder)
        same = np.array_equal(ds.frames["action"], source.select(kept).frames["action"])
        interface = ds.info.get("labkit") == source.info["labkit"]
        quantiles = all("q01" in s for s in ds.stats.values()) and bool(ds.stats)
        ok = same and interface and quantiles and ds.num_episodes == len(kept)
        failures += not ok
        tools.append((label, f"{len(ds)} / {ds.num_episodes}", _mark(same), _mark(interface), _mark(quantiles)))

    # labkit reads what LeRobot's create API wrote.
    created = load_dataset(out / "created")
    written = np.load(out / "created.npz")
    read_ok = (created.num_episodes == 2 and created.lengths.tolist() == [7, 5]
               and all(np.array_equal(created.frames[k], written[k]) for k in written.files)
               and created.frames["observation.images.top"].shape == (12, 32, 32, 3))
    failures += not read_ok

    print(f"\nLeRobot {summary['lerobot']} <-> labkit, every shipped dataset\n")
    print("| dataset | frames / episodes | LeRobot's counts and episode bounds | tabular columns equal | "
          "video frames equal (cameras) | LeRobot's QUANTILES normalisation accepts it |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nLeRobot's dataset tools on `{SPLIT_DATASET}`, read back by labkit\n")
    print("| tool | frames / episodes | actions equal to the kept episodes | env interface kept | stats with quantiles |")
    print("|---|---|---|---|---|")
    for row in tools:
        print("| " + " | ".join(row) + " |")
    print(f"\nlabkit reads a dataset written by LeRobot's create API (state, action, video): {_mark(read_ok)} "
          f"({created.num_episodes} episodes, {len(created)} frames, values equal)")
    print(f"\n{'all checks passed' if not failures else f'{failures} checks FAILED'}")
    return 1 if failures else 0


def _mark(ok: bool) -> str:
    return "yes" if ok else "NO"


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("lerobot", "labkit"):
        sys.exit(__doc__)
    out = Path(sys.argv[2])
    if sys.argv[1] == "lerobot":
        lerobot_half(out)
    else:
        sys.exit(labkit_half(out))
