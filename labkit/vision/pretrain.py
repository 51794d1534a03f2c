"""Pretrain the shipped frozen image encoders: read the simulator's state from randomised renders.

    python -m labkit.vision.pretrain arm      # -> labkit/vision/weights/arm_top.pt, arm_wrist.pt (+ .json)
    python -m labkit.vision.pretrain pusht    # -> labkit/vision/weights/pusht_top.pt

The recipe (supervised by privileged state, as "asymmetric" sim-to-real pipelines pretrain their
perception): roll the task's scripted expert out from hundreds of fresh placements, with a random look
every episode (`labkit.envs.look.RANDOM_LOOK`: lighting, colours, camera pose, noise) and noise on the
actions in half of them so that states off the demonstrations are seen too; render every camera on
every fourth frame; train one `PretrainedEncoder` per camera to predict the task's object quantities
(cube and zone, block pose, ...) from its image, with random shifts and colour jitter on every batch.
The encoder never sees the policy's data or its evaluation seeds; the last 10% of the episodes are held
out to report its error in physical units (the .json card beside the weights).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from labkit.envs.look import RANDOM_LOOK
from labkit.vision.augment import augment, to_float
from labkit.vision.encoders import WEIGHTS, PretrainedEncoder


def _arm_targets(state: np.ndarray) -> np.ndarray:
    # grasp point, cube, zone and their differences; the cube's yaw as cos/sin of 4x (a square repeats every 90 deg)
    yaw = state[:, 18:19] * 4
    return np.concatenate([state[:, 12:18], np.cos(yaw), np.sin(yaw), state[:, 19:26]], 1)


ARM_TARGETS = ["grasp_x", "grasp_y", "grasp_z", "cube_x", "cube_y", "cube_z", "cube_cos4yaw", "cube_sin4yaw",
               "zone_x", "zone_y", "cube_minus_grasp_x", "cube_minus_grasp_y", "cube_minus_grasp_z",
               "zone_minus_cube_x", "zone_minus_cube_y"]
PUSHT_TARGETS = ["pusher_x", "pusher_y", "block_x", "block_y", "block_cos", "block_sin",
                 "bar_left_x", "bar_left_y", "bar_right_x", "bar_right_y", "stem_x", "stem_y"]


@dataclass
class Recipe:
    env_id: str
    cameras: tuple[str, ...]  # env observation keys: "pixels" is the top camera
    targets: list[str]
    target_fn: object  # state [N, S] -> targets [N, T]
    action_noise: float  # std of the noise on the expert's actions in half the episodes, in action units
    keep: object = None  # state [S] -> whether to keep the frame (None: all)


def _cube_in_view(state: np.ndarray) -> bool:
    # A cube knocked off the workspace is out of the top camera's view: its position is not in the
    # image, and training on it taught the encoder to guess (held-out cube error ~10 cm).
    return 0.05 <= state[15] <= 0.33 and abs(state[16]) <= 0.16 and state[17] > -0.01


RECIPES = {
    "arm": Recipe("labkit/ArmPickCube-v0", ("pixels", "wrist"), ARM_TARGETS, _arm_targets, 0.02, _cube_in_view),
    "pusht": Recipe("labkit/PushT-v0", ("pixels",), PUSHT_TARGETS, lambda s: s, 0.01),
}


def render(task: str, size: int = 64, episodes: int = 500, every: int = 4, seed: int = 0) -> dict:
    """Roll the task's noisy expert out from `episodes` fresh configurations under random looks and
    render every `every`-th frame: {"images": {camera: uint8 [N, H, W, 3]}, "targets": float32 [N, T],
    "episode": [N]}. Seeds 100000 + seed * episodes + e: never a dataset's (0-199) or an evaluation's
    (1000+). Many configurations matter more than many frames: an encoder trained on the 180 cube and
    zone placements of a shipped dataset memorised them (held-out cube error 1.5-3.3 cm, against
    0.6-1.0 cm on its own placements)."""
    import labkit.envs  # noqa: PLC0415 (the experts)

    r = RECIPES[task]
    env = gym.make(r.env_id, look=RANDOM_LOOK)
    task_env = env.unwrapped
    expert = labkit.envs.expert(env)
    rng = np.random.default_rng(seed)
    cameras = {c: ("top" if c == "pixels" else c) for c in r.cameras}
    images = {c: [] for c in r.cameras}
    states, episode = [], []
    for e in range(episodes):
        s = 100_000 + seed * episodes + e
        obs, _ = env.reset(seed=s)
        expert.reset(seed=s)
        offset, t, done = int(rng.integers(every)), 0, False
        while not done:
            if t % every == offset and (r.keep is None or r.keep(obs["state"])):
                for c, name in cameras.items():
                    images[c].append(task_env.render_camera(name, size))
                states.append(obs["state"])
                episode.append(e)
            a = np.asarray(expert(obs), np.float32)
            if e % 2 == 1:  # half the episodes wander off the expert's path: states a policy may reach
                a = a + rng.normal(0, r.action_noise, a.shape).astype(np.float32)
            obs, _, term, trunc, _ = env.step(a)
            done, t = term or trunc, t + 1
    return {"images": {c: np.stack(v) for c, v in images.items()},
            "targets": r.target_fn(np.stack(states)).astype(np.float32), "episode": np.array(episode)}


def train_encoder(images: np.ndarray, targets: np.ndarray, held_out: np.ndarray, task: str, camera: str,
                  steps: int = 3000, batch_size: int = 128, lr: float = 2e-3, seed: int = 0) -> tuple:
    """One PretrainedEncoder trained to predict `targets` from `images`; returns it (frozen), and the
    held-out RMSE and median absolute error of each target, in its own units."""
    torch.manual_seed(seed)
    r = RECIPES[task]
    enc = PretrainedEncoder(r.targets, images.shape[1], "top" if camera == "pixels" else camera, task)
    x, y = torch.as_tensor(images), torch.as_tensor(targets)
    train_rows = torch.as_tensor(np.flatnonzero(~held_out))
    test_rows = torch.as_tensor(np.flatnonzero(held_out))
    mean, std = y[train_rows].mean(0), y[train_rows].std(0).clamp(min=1e-3)
    enc.target_mean.copy_(mean)
    enc.target_std.copy_(std)
    opt = torch.optim.AdamW(enc.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    enc.train()
    for _ in range(steps):
        idx = train_rows[torch.randint(0, len(train_rows), (batch_size,), generator=gen)]
        pred = enc.predict(augment(to_float(x[idx]), shift=True, color=True))
        loss = (pred - (y[idx] - mean) / std).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    enc.freeze()
    with torch.no_grad():
        pred = torch.cat([enc.predict(to_float(x[test_rows[i:i + 512]])) for i in range(0, len(test_rows), 512)])
    err = pred * std + mean - y[test_rows]
    rmse, median = err.pow(2).mean(0).sqrt().tolist(), err.abs().median(0).values.tolist()
    return enc, dict(zip(r.targets, rmse, strict=True)), dict(zip(r.targets, median, strict=True))


def pretrain(task: str, size: int = 64, steps: int = 3000, episodes: int = 500, out: Path = WEIGHTS,
             seed: int = 0) -> dict:
    """Render, train one encoder per camera, save `<task>_<camera>.pt` and a `.json` card; return the cards."""
    t0 = time.time()
    data = render(task, size, episodes, seed=seed)
    n_ep = int(data["episode"].max()) + 1
    held_out = data["episode"] >= int(n_ep * 0.9)
    render_min = (time.time() - t0) / 60
    cards = {}
    for camera, images in data["images"].items():
        t1 = time.time()
        enc, rmse, median = train_encoder(images, data["targets"], held_out, task, camera, steps, seed=seed)
        name = f"{task}_{'top' if camera == 'pixels' else camera}"
        Path(out).mkdir(parents=True, exist_ok=True)
        enc.save(Path(out) / f"{name}.pt")
        cards[name] = {
            "command": f"python -m labkit.vision.pretrain {task} --size {size} --steps {steps} --episodes {episodes}",
            "frames": int(len(images)), "episodes": n_ep, "held_out_episodes": n_ep - int(n_ep * 0.9),
            "image_size": size, "steps": steps, "render_minutes": round(render_min, 2),
            "train_minutes": round((time.time() - t1) / 60, 2), "torch_threads": torch.get_num_threads(),
            "held_out_rmse": {k: round(v, 5) for k, v in rmse.items()},
            "held_out_median_abs_error": {k: round(v, 5) for k, v in median.items()},
            "parameters": sum(p.numel() for p in enc.parameters()),
        }
        (Path(out) / f"{name}.json").write_text(json.dumps(cards[name], indent=1) + "\n")
    return cards


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m labkit.vision.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("task", choices=sorted(RECIPES))
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--steps", type=int, default=3000, help="training steps per camera (default 3000)")
    p.add_argument("--episodes", type=int, default=500, help="expert episodes to render (default 500)")
    p.add_argument("--out", type=Path, default=WEIGHTS, help=f"output folder (default {WEIGHTS})")
    a = p.parse_args(argv)
    for name, card in pretrain(a.task, a.size, a.steps, a.episodes, a.out).items():
        print(name, json.dumps(card))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
