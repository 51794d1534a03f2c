"""World models: learned dynamics to imagine with, evaluate policies in, improve them with and plan with.

    wm = StateWorldModel(6, 2).fit(transitions_from_episodes(episodes))      # dynamics.py
    evaluate(policy, "labkit/Imagined-v0", env_kwargs={"world_model": wm})   # imagined.py
    policy, history = improvement_loop(policy, wm, demos, like, env_id)      # improve.py (VLAW)
    planner = CEMPlanner(policy, wm, ValueFunction(6).fit(episodes))         # planning.py (Cosmos Policy)
    pixel_wm = PixelWorldModel().fit(*render_episodes(env_id, 30))           # pixel.py
    wm.save("wm.pt"); wm = load_world_model("wm.pt")                         # io.py
"""

import gymnasium as gym

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
from labkit.world_models.io import SavedWorldModel, load_world_model
from labkit.world_models.pixel import PixelPredictor, PixelWorldModel, render_episodes, robot_position
from labkit.world_models.planning import BestOfNPlanner, CEMPlanner, ValueFunction, score_chunks

if ID not in gym.registry:  # no max_episode_steps: ImaginedEnv truncates at its own horizon
    gym.register(id=ID, entry_point="labkit.world_models.imagined:ImaginedEnv")

__all__ = ["SavedWorldModel", "load_world_model", "EVENTS", "StateWorldModel", "WorldModelConfig", "gaussian_nll", "transitions_from_episodes",
           "ImaginedEnv", "imagine", "start_states", "LoopConfig", "collect_episodes", "dataset_from_episodes",
           "episodes_from_dataset", "improvement_loop", "resample", "weights", "PixelWorldModel", "PixelPredictor", "render_episodes",
           "robot_position", "BestOfNPlanner", "CEMPlanner", "ValueFunction", "score_chunks"]
