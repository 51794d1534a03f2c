"""Episode datasets in the LeRobotDataset v3 layout: record, store, load, window and normalise.

    root = record("labkit/Detour-v0", labkit.envs.expert(env), "data/detour", episodes=50)
    ds = load_dataset(root, env_id="labkit/Detour-v0")
    batch = ds.windows(obs_horizon=2, horizon=16)
    norm = ds.normalizer()                         # an nn.Module: its stats travel in checkpoints

Data recorded with LeRobot on a real arm loads here, and data recorded here loads in LeRobot.
"""

from labkit.data.dataset import EpisodeDataset, check_compatible, load_dataset
from labkit.data.format import DatasetError
from labkit.data.keys import env_key, feature_key
from labkit.data.minari import from_minari, to_minari  # minari itself is imported only when they run
from labkit.data.normalize import Normalizer
from labkit.data.recorder import Recorder, record
from labkit.data.shipped import DATASETS, EVAL_SEED, SHIPPED, open_dataset

__all__ = ["record", "Recorder", "load_dataset", "EpisodeDataset", "Normalizer", "DatasetError",
           "check_compatible", "feature_key", "env_key", "DATASETS", "EVAL_SEED", "SHIPPED", "open_dataset",
           "to_minari", "from_minari"]
