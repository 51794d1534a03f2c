"""Bring an existing dataset's meta up to today's format, its data and videos untouched (byte-identical).

A module of its own because it reads a dataset (labkit.data.dataset) and writes meta (labkit.data.format):
above both, so neither imports the other.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from labkit.data import format as fmt
from labkit.data.dataset import load_dataset


def refresh_meta(root: str | Path) -> Path:
    """Rewrite the meta of the dataset at `root` in today's format without touching its data or videos
    (they stay byte-identical): quantiles (q01..q99) in stats.json, LeRobot's per-episode stats/* columns in
    the episodes table, the env interface copied into the action feature. Per-episode and image statistics
    are computed from the stored frames (videos decoded); the dataset's existing min/max/mean/std/count
    entries are kept as they are, so anything normalised with them is unchanged.

        python -c "import sys; from labkit.data.refresh import refresh_meta; [refresh_meta(p) for p in sys.argv[1:]]" datasets/*/
    """
    ds = load_dataset(root)
    root = Path(root)
    features = ds.info["features"]
    keys = [k for k, v in ds.frames.items() if k in features and v.dtype.kind in "biuf"]
    merged: dict[str, dict] = {}
    rows: list[dict[str, list]] = []
    for e in range(ds.num_episodes):
        a, b = ds.episode_from[e], ds.episode_to[e]
        entries = {}
        for key in keys:
            image = fmt.is_image(features[key])
            partial = fmt.episode_stats(ds.frames[key][a:b], image=image)
            merged[key] = fmt.merge_stats(merged.get(key), partial)
            entries[key] = fmt.finish_stats(partial, features[key]["shape"], image=image)
        rows.append(fmt.stats_columns(entries))
    stats = {}
    for key, partial in merged.items():
        fresh = fmt.finish_stats(partial, features[key]["shape"], image=fmt.is_image(features[key]))
        stats[key] = {**fresh, **{k: v for k, v in ds.stats.get(key, {}).items() if k in ("min", "max", "mean", "std", "count")}}
    # The episodes table: its rows as they are (by episode_index), the stats/* columns (re)written.
    paths = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    by_episode = dict(zip(ds.episodes["episode_index"].tolist(), rows, strict=True))
    for path in paths:
        table = fmt.read_parquet(path, "episodes table")
        table = table.select([c for c in table.column_names if not c.startswith("stats/")])
        mine = [by_episode[e] for e in table.column("episode_index").to_pylist()]
        for name in mine[0] if mine else ():
            table = table.append_column(name, pa.array([r[name] for r in mine]))
        fmt.write_parquet(path, table)
    fmt.write_json(root / fmt.STATS_PATH, stats)
    info = fmt.read_json(root / fmt.INFO_PATH)  # as stored (the loader may have filled fields in)
    info["features"] = fmt.with_interface(info["features"], fmt.interface_of(info))
    fmt.write_json(root / fmt.INFO_PATH, info)
    return root
