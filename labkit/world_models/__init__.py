"""World models: learned dynamics to imagine with, evaluate policies in, improve them with and plan with.

    wm = StateWorldModel(6, 2).fit(transitions_from_episodes(episodes))      # dynamics.py
    evaluate(policy, "labkit/Imagined-v0", env_kwargs={"world_model": wm})   # imagined.py
    policy, history = improvement_loop(policy, wm, demos, like, env_id)      # improve.py (VLAW)
    planner = CEMPlanner(policy, wm, ValueFunction(6).fit(episodes))         # planning.py (Cosmos Policy)
    pixel_wm = PixelWorldModel().fit(*render_episodes(env_id, 30))           # pixel.py
    wm.save("wm.pt"); wm = load_world_model("wm.pt")                         # io.py
"""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import torch

from labkit.training import read_checkpoint
from labkit.world_models.dynamics import (
    EVENTS,
    StateWorldModel,
    WorldModelConfig,
    gaussian_nll,
    transitions_from_episodes,
)
from labkit.world_models.imagined import ID, ImaginedEnv, imagine, start_states
from labkit.world_models.improve import (
    LoopConfig,
    collect_episodes,
    dataset_from_episodes,
    episodes_from_dataset,
    improvement_loop,
    resample,
    weights,
)
from labkit.world_models.io import SavedWorldModel
from labkit.world_models.pixel import (
    PixelPredictor,
    PixelWorldModel,
    pixel_loss,
    render_episodes,
    robot_position,
)
from labkit.world_models.planning import BestOfNPlanner, CEMPlanner, ValueFunction, score_chunks


def load_world_model(path: str | Path, map_location: str | torch.device = "cpu"):
    """Rebuild a world model saved with `.save(path)`, in eval mode."""
    ckpt = read_checkpoint(path, "world-model checkpoint", map_location)
    name = ckpt.get("world_model_class")
    if name not in SavedWorldModel.registry:
        raise ValueError(f"{path} is not a labkit world-model checkpoint (class {name!r}; "
                         f"known: {sorted(SavedWorldModel.registry)})")
    try:
        model = SavedWorldModel.registry[name](**ckpt["init_args"])
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
        # A damaged checkpoint: missing or mistyped arguments, weights that do not fit the architecture.
        raise ValueError(f"{path}: cannot rebuild the {name} it names: {type(e).__name__}: {e}") from e
    return model.eval()


if ID not in gym.registry:  # no max_episode_steps: ImaginedEnv truncates at its own horizon
    gym.register(id=ID, entry_point="labkit.world_models.imagined:ImaginedEnv")

__all__ = ["SavedWorldModel", "load_world_model", "EVENTS", "StateWorldModel", "WorldModelConfig", "gaussian_nll", "transitions_from_episodes",
           "ImaginedEnv", "imagine", "start_states", "LoopConfig", "collect_episodes", "dataset_from_episodes",
           "episodes_from_dataset", "improvement_loop", "resample", "weights", "PixelWorldModel", "PixelPredictor", "pixel_loss", "render_episodes",
           "robot_position", "BestOfNPlanner", "CEMPlanner", "ValueFunction", "score_chunks"]
