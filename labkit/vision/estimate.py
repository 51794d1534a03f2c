"""PushT from the top camera through an estimated block frame: perception first, then a state policy.

Lesson 02's PushT recipe reaches 98% from state because it sees the task from the block (`frame="block"`)
and commands small moves; a pixel policy has no block pose to build that frame from, and end to end it
stayed at 26-43% (README, "Pixels on a CPU"). Here the shipped frozen encoder `pusht_top` reads the
block's pose from the 64 px top camera, and everything after it is the state recipe run on that estimate:

    pose^      = (x^, y^, atan2(sin^, cos^))        the encoder's reading of the block (metres, radians)
    s          = block_frame_state(pose^, pusher)    what frame="block" observes, from the estimate
    m_block    ~ pi(. | s_{t-3..t})                  a state flow policy's move, in the estimated block's axes
    m_world    = R(theta^) m_block                   back to world axes with the same estimate

The policy is trained on estimates too (`estimated_block_dataset`: every frame of a pixel dataset read by
the same encoder, the recorded world-axis moves turned into the estimated block's axes), never on the
true pose, so it learns with the errors it will meet. What it reads at run time is the camera and the
pusher's own position (`proprio`), as a real pusher would.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from labkit.envs.pusht import block_frame_state
from labkit.vision.encoders import PretrainedEncoder

ENV_ID = "labkit/PushT-v0"
POSE_TARGETS = ("block_x", "block_y", "block_cos", "block_sin")


def read_pose(encoder: PretrainedEncoder, images) -> np.ndarray:
    """uint8 top-camera images [N, H, W, 3] -> the estimated block poses [N, 3] (x, y, angle)."""
    missing = [t for t in POSE_TARGETS if t not in encoder.targets]
    if missing:
        raise ValueError(f"encoder {encoder.task}_{encoder.camera} does not read the block's pose (no {missing}); "
                         "use the PushT top-camera encoder ('pusht_top')")
    x = torch.as_tensor(np.asarray(images))
    with torch.no_grad():
        pred = torch.cat([encoder.predict(encoder.prepare(x[i:i + 512])) for i in range(0, len(x), 512)])
    pred = (pred * encoder.target_std + encoder.target_mean).numpy()
    bx, by, c, s = (pred[:, encoder.targets.index(t)] for t in POSE_TARGETS)
    return np.stack([bx, by, np.arctan2(s, c)], -1)


def rotate(v: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Rotate 2-D vectors [N, 2] by angles [N] (counter-clockwise); -theta takes world axes to a block's."""
    c, s = np.cos(theta), np.sin(theta)
    return np.stack([c * v[:, 0] - s * v[:, 1], s * v[:, 0] + c * v[:, 1]], -1).astype(np.float32)


def estimated_states(poses: np.ndarray, pushers: np.ndarray) -> np.ndarray:
    """Block-frame states [N, 12] from estimated poses [N, 3] and the pusher's positions [N, 2]."""
    return np.stack([block_frame_state(p, q) for p, q in zip(poses, pushers, strict=True)]).astype(np.float32)


def estimated_block_dataset(dataset, encoder: PretrainedEncoder | None = None):
    """A PushT pixel dataset recorded with `actions="relative"` in the world frame (the shipped
    `pusht_rel_pixels`) -> an in-memory dataset of block-frame states built from the encoder's estimates
    (`observation.state`) and the recorded moves in the estimated block's axes (`action`)."""
    from labkit.data.dataset import EpisodeDataset  # noqa: PLC0415 (the data layer is not needed to act)

    env = (getattr(dataset, "info", None) or {}).get("labkit") or {}
    kwargs = env.get("env_kwargs") or {}
    if env.get("env_id") != ENV_ID or kwargs.get("actions") != "relative" or kwargs.get("frame", "world") != "world":
        raise ValueError(f"need PushT pixels recorded with world-frame relative actions (the 'pusht_rel_pixels' "
                         f"dataset); this one records {env or 'no env interface'}")
    for key in ("observation.images.top", "observation.proprio", "action"):
        if key not in dataset.frames:
            raise ValueError(f"dataset has no {key!r}; it has {sorted(dataset.frames)}")
    encoder = encoder or PretrainedEncoder.load("pusht_top")
    f = dataset.frames
    poses = read_pose(encoder, f["observation.images.top"])
    states = estimated_states(poses, f["observation.proprio"][:, :2])
    moves = rotate(np.asarray(f["action"], np.float32), -poses[:, 2])
    episodes = [{"observation.state": states[a:b], "action": moves[a:b]}
                for a, b in zip(dataset.episode_from, dataset.episode_to, strict=True)]
    return EpisodeDataset.from_episodes(episodes, fps=dataset.fps)


class EstimatedBlockPolicy:
    """The runtime: top camera + pusher position -> a world-axis move, through the estimated block frame.
    `policy` is a labkit state policy trained on `estimated_block_dataset`. Rolled out by `labkit.eval`
    in PushT's pixel mode at the encoder's image size with relative actions (its `data_env`)."""

    def __init__(self, policy, encoder: PretrainedEncoder | None = None):
        if list(policy.config.obs_keys) != ["observation.state"] or policy.shapes["observation.state"] != [12]:
            raise ValueError("EstimatedBlockPolicy runs a state policy trained on estimated_block_dataset "
                             f"(observation.state of 12); got obs_keys {list(policy.config.obs_keys)}")
        self.policy = policy
        self.encoder = encoder or PretrainedEncoder.load("pusht_top")
        # What it reads, for labkit.eval's interface check: the camera and the pusher.
        self.config = SimpleNamespace(obs_keys=["observation.images.top", "observation.proprio"],
                                      obs_horizon=policy.config.obs_horizon,
                                      n_action_steps=policy.config.n_action_steps)
        self.data_env = {"env_id": ENV_ID, "env_kwargs": {"obs_mode": "pixels", "image_size": self.encoder.image_size,
                                                          "actions": "relative"}}

    @property
    def base_policy(self):
        return self

    def reset(self) -> None:
        self.policy.reset()

    def select_action(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        if "pixels" not in obs or "proprio" not in obs:
            raise KeyError(f"EstimatedBlockPolicy reads 'pixels' (the top camera) and 'proprio'; got {sorted(obs)}. "
                           "Make the env with obs_mode='pixels'.")
        images, proprio = np.asarray(obs["pixels"]), np.asarray(obs["proprio"], np.float32)
        single = images.ndim == 3
        if single:
            images, proprio = images[None], proprio[None]
        if images.dtype != np.uint8 or images.shape[-1] != 3:
            raise ValueError(f"the top camera must give uint8 HxWx3 frames, got {images.dtype} {images.shape[1:]}")
        poses = read_pose(self.encoder, images)
        moves = self.policy.select_action({"state": estimated_states(poses, proprio[:, :2])})
        out = rotate(np.atleast_2d(moves), poses[:, 2])
        return out[0] if single else out
