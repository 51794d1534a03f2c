"""labkit's MuJoCo tasks as registered gymnasium envs, and their scripted experts.

    env = gym.make("labkit/Detour-v0", obs_mode="state", reward_type="sparse")
    expert = labkit.envs.expert(env)     # a callable obs -> action with reset(seed)

Physics options for domain randomisation (`friction`, `mass`, `damping` as multipliers or ranges,
`obs_noise` as a std) are keyword arguments of `gym.make`.

Other processes: gymnasium has no plugin hook, so the children of gymnasium's `AsyncVectorEnv` or
Stable-Baselines3's `SubprocVecEnv` only find labkit's envs with the id form that names the module
registering them, `gym.make("labkit.envs:labkit/Detour-v0")`.
"""

from __future__ import annotations

import gymnasium as gym

# String entry points, so that tools which re-create envs in other processes can find them.
TASKS = {
    "labkit/Detour-v0": ("labkit.envs.detour:DetourEnv", "labkit.envs.detour:DetourExpert", 100),
    "labkit/PushT-v0": ("labkit.envs.pusht:PushTEnv", "labkit.envs.pusht:PushTExpert", 300),
    "labkit/PegInsert-v0": ("labkit.envs.peg:PegInsertEnv", "labkit.envs.peg:PegInsertExpert", 60),
    "labkit/ArmPickCube-v0": ("labkit.envs.arm:ArmPickCubeEnv", "labkit.envs.arm:ArmPickCubeExpert", 300),
    "labkit/Tabletop-v0": ("labkit.envs.tabletop:TabletopEnv", "labkit.envs.tabletop:TabletopExpert", 80),
    # The canonical PushT (gym-pusht, the `pusht` extra) behind labkit's contract; 300 steps as gym-pusht.
    "labkit/GymPushT-v0": ("labkit.envs.gym_pusht:GymPushTEnv", "labkit.envs.gym_pusht:GymPushTExpert", 300),
    # Memory tasks (lesson 13): a cue shown early then hidden; a locked door to remember after a failed try.
    "labkit/Cups-v0": ("labkit.envs.cups:CupsEnv", "labkit.envs.cups:CupsExpert", 60),
    "labkit/Doors-v0": ("labkit.envs.doors:DoorsEnv", "labkit.envs.doors:DoorsExpert", 90),
}

for _id, (_entry, _expert, _steps) in TASKS.items():
    if _id not in gym.registry:
        gym.register(id=_id, entry_point=_entry, max_episode_steps=_steps)


def _load(path: str):
    module, name = path.split(":")
    return getattr(__import__(module, fromlist=[name]), name)


def expert(env, **kwargs):
    """The scripted expert of `env`'s task: a callable `obs -> action` with `reset(seed=None)`."""
    spec = getattr(env, "spec", None) or getattr(env.unwrapped, "spec", None)
    if spec is None or spec.id not in TASKS:
        known = ", ".join(TASKS)
        raise ValueError(f"no scripted expert for {spec.id if spec else env!r}; labkit tasks: {known}")
    return _load(TASKS[spec.id][1])(env, **kwargs)


__all__ = ["TASKS", "expert"]
