"""The policy contract every labkit policy follows, and the checkpoint format that rebuilds one.

A policy is a LightningModule that robot code drives through three calls (LeRobot's contract):
`predict_action_chunk(obs_batch) -> [B, H, A]`, `select_action(obs) -> [A]` (keeps an observation
history and an action queue, executing `n_action_steps` of each chunk before predicting again) and
`reset()`. Subclasses implement `loss(obs, action, is_pad)` and `predict_normalized(obs)`; the base
class owns normalisation, the queues, the optimiser and the checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from labkit.data import DatasetError, Normalizer
from labkit.data.dataset import infer_interface
from labkit.data.keys import env_key, is_image_feature
from labkit.policies.runtime import ChunkRuntime
from labkit.training import check_finite_loss, log_loss
from labkit.vision import ENCODERS
from labkit.vision.encoders import pretrained_meta

# Env options that change what the state and the action mean, with their defaults: a policy is rolled
# out with the values it was trained with. (Physics options such as friction stay the caller's choice.)
INTERFACE_KWARGS = {"frame": "world", "actions": "absolute", "embodiment": "robot", "instruction": "code"}
# ... and, for a policy that reads cameras, what they show: pixels at the size it was trained on.
CAMERA_KWARGS = {"obs_mode": "state", "image_size": 96}


def env_interface(env: dict | None) -> dict:
    """{"env_id": ..., "env_kwargs": {...}} with only the interface options kept ({} when unknown)."""
    if not env:
        return {}
    kwargs = {k: v for k, v in (env.get("env_kwargs") or {}).items() if k in INTERFACE_KWARGS or k in CAMERA_KWARGS}
    return {"env_id": env.get("env_id"), "env_kwargs": kwargs}


class MissingInterfaceError(DatasetError):
    """Training data that does not say which env interface (env id, frame, action kind) it was recorded with."""


def dataset_env(dataset, env: dict | None = None) -> dict:
    """The env interface a policy trained on `dataset` is rolled out in, as a policy's `env`: `env` when
    given ({} for none, e.g. real-robot data), else the one the dataset records (`infer_interface`: its
    info.json, or gym-pusht's for data laid out as lerobot/pusht). A dataset read from disk that records
    none is refused with MissingInterfaceError: trained blind, a relative-action or block-frame policy
    would be rolled out in the env's defaults and score ~0 without saying why."""
    if env is not None:
        return env_interface(env)
    interface = infer_interface(getattr(dataset, "info", None) or {})
    root = getattr(dataset, "root", None)
    if interface is None and root is not None:  # in-memory datasets (no root) are the caller's own making
        raise MissingInterfaceError(
            f"dataset {root} does not record the env interface it was recorded with (meta/info.json has no "
            "'labkit' field and its action feature no copy of one: LeRobot's split/delete/merge tools keep "
            "only the copy, and data recorded elsewhere has neither). Pass it explicitly: "
            "Policy.from_dataset(ds, env={'env_id': 'labkit/PushT-v0', 'env_kwargs': {'frame': 'block', "
            "'actions': 'relative'}}) or, for `labkit fit`, `env: {env_id: ..., env_kwargs: {...}}` under "
            "`data:` (--data.env '{\"env_id\": ..., \"env_kwargs\": {...}}'); env={} trains with none "
            "(e.g. real-robot data)")
    return env_interface(interface)


def rollout_kwargs(policy, env_id: str, env_kwargs: dict) -> dict:
    """`env_kwargs` for rolling `policy` out in `env_id`, with the interface options it was trained
    with filled in. Asking for a different one (a block-frame PushT policy in the world frame) is an
    error: the policy would read the wrong numbers and score ~0 without saying why."""
    trained_in = getattr(policy, "data_env", None) or {}
    if trained_in.get("env_id") != env_id:
        return dict(env_kwargs)
    out = dict(env_kwargs)
    config = getattr(getattr(policy, "base_policy", policy), "config", None)
    sees = config is not None and any(is_image_feature(k) for k in config.obs_keys)
    for key, default in {**INTERFACE_KWARGS, **(CAMERA_KWARGS if sees else {})}.items():
        trained = trained_in["env_kwargs"].get(key, default)
        if out.get(key, trained) != trained:
            raise ValueError(f"this policy was trained on {env_id} with {key}={trained!r}; "
                             f"it cannot be rolled out with {key}={out[key]!r}")
        if trained != default:
            out[key] = trained
    return out


@dataclass
class PolicyConfig:
    """What every policy shares: which observations it sees, and its chunking."""

    obs_keys: tuple[str, ...] = ("observation.state",)
    obs_horizon: int = 2  # observations stacked as input (Diffusion Policy's n_obs_steps)
    horizon: int = 16  # length of the predicted action chunk
    n_action_steps: int = 8  # actions executed from each chunk before predicting again
    lr: float = 1e-3
    weight_decay: float = 1e-6
    warmup_steps: int = 100
    # How cameras are read (labkit.vision): "conv" (average-pooled conv net), "keypoints" (conv +
    # spatial softmax, trained end to end) or "pretrained" (the shipped frozen encoder of the task
    # `pretrained` names, e.g. "arm": features computed once per frame, so training runs at state speed).
    image_encoder: str = "conv"
    image_dim: int = 64  # features per camera (conv) or 2 x keypoints (keypoints)
    pretrained: str | None = None
    pretrained_meta: dict | None = None  # filled from the shipped encoders: checkpoints rebuild without them

    def __post_init__(self):
        self.obs_keys = tuple(self.obs_keys)
        if self.image_encoder not in ENCODERS:
            raise ValueError(f"image_encoder must be one of {ENCODERS}, got {self.image_encoder!r}")
        if self.image_encoder == "pretrained" and not self.pretrained:
            raise ValueError("image_encoder='pretrained' needs pretrained=<task> (e.g. 'arm' or 'pusht')")
        if self.image_dim < 2:
            raise ValueError(f"image_dim must be >= 2, got {self.image_dim}")
        if not 1 <= self.n_action_steps <= self.horizon:
            raise ValueError(f"need 1 <= n_action_steps <= horizon, got {self.n_action_steps}, {self.horizon}")
        if self.obs_horizon < 1:
            raise ValueError(f"obs_horizon must be >= 1, got {self.obs_horizon}")
        if not self.obs_keys:
            raise ValueError("obs_keys must name at least one observation (e.g. 'observation.state')")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


class Policy(ChunkRuntime, L.LightningModule):
    """Base class: normalisation, the runtime contract, optimiser and checkpointing."""

    config_class: type[PolicyConfig] = PolicyConfig
    # Classes that `load_policy` may rebuild, by name: every Policy subclass registers itself here when
    # it is defined, so a checkpoint can only name policy code, never arbitrary code.
    registry: dict[str, type[Policy]] = {}
    data_env: dict = {}  # set per policy in __init__ (a plain attribute here, where wrappers have a property)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Policy.registry[cls.__name__] = cls

    def __init__(self, config: PolicyConfig | dict, shapes: dict[str, list[int]], stats: dict[str, dict],
                 env: dict | None = None):
        super().__init__()
        if isinstance(config, dict):
            names = {f.name for f in dataclasses.fields(self.config_class)}
            unknown = set(config) - names
            if unknown:
                raise ValueError(f"unknown {self.config_class.__name__} fields: {sorted(unknown)}")
            config = self.config_class(**config)
        self.config = config
        if config.image_encoder == "pretrained" and not config.pretrained_meta:
            config.pretrained_meta = pretrained_meta(config.pretrained, [k for k in config.obs_keys if is_image_feature(k)])
        missing = [k for k in (*config.obs_keys, "action") if k not in shapes]
        if missing:
            raise ValueError(f"shapes lack {missing}; the dataset has {sorted(shapes)}")
        self.shapes = {k: list(shapes[k]) for k in (*config.obs_keys, "action")}
        self.stats = {k: {s: np.asarray(v).tolist() for s, v in stats[k].items()} for k in self.shapes if k in stats}
        self.action_dim = self.shapes["action"][0]
        modes = {k: ("min_max" if k == "action" else "identity" if is_image_feature(k) else "mean_std")
                 for k in self.shapes}
        self.normalizer = Normalizer.from_stats(self.stats, modes)
        # The env interface its data was recorded with ({"env_id", "env_kwargs"}, e.g. PushT's block
        # frame): `labkit.eval.evaluate` rolls the policy out in it, so a checkpoint evaluates as trained.
        self.data_env = env_interface(env)
        self.save_hyperparameters({"policy_class": type(self).__name__, "config": dataclasses.asdict(config),
                                   "shapes": self.shapes, "stats": self.stats, "env": self.data_env})
        self.loss_history: list[torch.Tensor] = []
        # A hand-written loss of one batch, `fn(policy, batch) -> loss`, set by `fit(training_step=fn)`
        # for the length of one fit: a lesson trains with the student's code instead of the method's.
        self.batch_loss_fn = None
        self.reset()

    @classmethod
    def from_dataset(cls, dataset, env: dict | None = None, **config) -> Policy:
        """Build a policy whose shapes and normaliser come from `dataset` (a labkit EpisodeDataset) and
        whose env interface is the dataset's, or `env` ({"env_id", "env_kwargs"}) when given (`dataset_env`)."""
        cfg = cls.config_class(**config)
        shapes = {k: list(dataset.frames[k].shape[1:]) for k in (*cfg.obs_keys, "action") if k in dataset.frames}
        return cls(cfg, shapes, dataset.stats, dataset_env(dataset, env))

    # ---- what a method provides ---------------------------------------------------------------
    def loss(self, obs: dict[str, torch.Tensor], action: torch.Tensor, is_pad: torch.Tensor) -> torch.Tensor:
        """The method's training loss on normalised observations and actions."""
        raise NotImplementedError

    def predict_normalized(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """A normalised action chunk [B, H, A] from normalised observations."""
        raise NotImplementedError

    def prepare_training(self, tensors: dict, dataset) -> dict:
        """Called by `fit` with the training windows before the first step; may add per-window
        tensors that `training_step` reads (PostBC adds its posterior spread). Default: unchanged."""
        return tensors

    # ---- normalisation ------------------------------------------------------------------------
    def normalize_obs(self, obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for k in self.config.obs_keys:
            if k not in obs:
                raise KeyError(f"observation batch lacks {k!r}; it has {sorted(obs)}")
            x = torch.as_tensor(obs[k], device=self.device)
            out[k] = x if is_image_feature(k) else self.normalizer.normalize(k, x.float())
        return out

    # ---- training -----------------------------------------------------------------------------
    def batch_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The training loss of one batch in raw units ({"obs", "action", "action_is_pad"}): normalise,
        then the method's `loss`."""
        obs = self.normalize_obs(batch["obs"])
        action = self.normalizer.normalize("action", batch["action"].float())
        return self.loss(obs, action, batch["action_is_pad"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.batch_loss_fn(self, batch) if self.batch_loss_fn is not None else self.batch_loss(batch)
        if not torch.isfinite(loss):  # one check (one host sync) a step: stop before NaN reaches the weights
            step = self.global_step if self._trainer is not None else batch_idx
            check_finite_loss(loss, step, f"{type(self).__name__}'s training loss", self.config.lr)
        self.loss_history.append(loss.detach())
        log_loss(self, loss)
        return loss

    def configure_optimizers(self):
        params = list(self.parameters())
        # Fused AdamW updates every tensor in one kernel instead of a Python loop of small ops: 3.5 -> 1.3 ms
        # a step for a 0.6M-parameter flow policy on one CPU thread. Same update up to rounding.
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        opt = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay, fused=fused)
        total = max(int(self.trainer.max_steps), 1) if self._trainer is not None else 1
        warm = min(self.config.warmup_steps, total // 10 + 1)

        def schedule(step: int) -> float:  # linear warm-up, then cosine decay to zero
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def losses(self) -> np.ndarray:
        """Training loss per step so far (for learning curves)."""
        return torch.stack(self.loss_history).cpu().numpy() if self.loss_history else np.zeros(0)

    # ---- the runtime contract (`reset` and `select_action` come from ChunkRuntime) -------------------
    @torch.no_grad()
    def predict_action_chunk(self, obs: dict[str, Any]) -> torch.Tensor:
        """Observation history batch {key: [B, obs_horizon, ...]} -> action chunk [B, H, A], physical units."""
        chunk = self.predict_normalized(self.normalize_obs(obs))
        return self.normalizer.unnormalize("action", chunk)

    @property
    def base_policy(self) -> Policy:
        return self

    @torch.no_grad()
    def select_action(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """One env observation (or a batch of them) -> the next action [A] (or [B, A]), in eval mode.

        Observations use the env's keys (`state`, `proprio`, `pixels`). A new chunk is predicted
        when the queue is empty; the first call after `reset()` repeats the first observation to
        fill the history, as the training windows do at an episode's start.
        """
        was_training = self.training
        self.eval()
        try:
            return super().select_action(obs)
        finally:
            self.train(was_training)

    def observation_frame(self, obs: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], bool]:
        """One env observation or a batch (env keys) -> ({dataset key: [B, ...] tensor}, whether it was one)."""
        frame, single = {}, None
        for key in self.config.obs_keys:
            name = env_key(key)
            if name not in obs:
                raise KeyError(f"policy needs observation {name!r} (dataset feature {key!r}); got {sorted(obs)}."
                               " For pixels, make the env with obs_mode='pixels'.")
            arr, expected = np.asarray(obs[name]), self.shapes[key]
            if is_image_feature(key) and (arr.dtype != np.uint8 or arr.ndim not in (3, 4)
                                          or list(arr.shape[-3:]) != expected):
                # A camera frame of another size, layout or type would be read as garbage (or crash deep in a
                # conv): name it here, before any motion. Never resized or padded: the fix is the camera's.
                chw = arr.ndim >= 3 and arr.shape[-3] == 3 and list(arr.shape[-2:]) == expected[:2]
                fix = ("transpose it to HxWx3" if chw else "convert it to uint8 0-255" if arr.dtype.kind == "f" else
                       "crop/resize the camera to that size explicitly (labkit.robot.opencv_camera(size=...))"
                       if list(arr.shape[-3:]) != expected else "give uint8 0-255 frames")
                raise ValueError(f"camera {name!r} (dataset feature {key!r}) gave a {'x'.join(map(str, arr.shape))} "
                                 f"{arr.dtype} image{' (channels first)' if chw else ''}; the policy was trained on "
                                 f"{'x'.join(map(str, expected))} uint8 frames (HxWx3 RGB, or a batch of them): {fix}")
            x = torch.as_tensor(arr, device=self.device)
            is_single = list(x.shape) == expected
            if not is_single and list(x.shape[1:]) != expected:
                raise ValueError(f"observation {name!r} has shape {tuple(x.shape)}; expected {tuple(expected)}"
                                 f" or a batch [B, {', '.join(map(str, expected))}]")
            single = is_single if single is None else single
            frame[key] = x[None] if is_single else x
        return frame, bool(single)

    # ---- checkpoints --------------------------------------------------------------------------
    def checkpoint(self) -> dict:
        """What `save` writes and `policy_from_checkpoint` rebuilds: weights, normaliser, config, shapes, env."""
        return {"hyper_parameters": dict(self.hparams), "state_dict": self.state_dict()}

    def save(self, path: str | Path) -> Path:
        """Write a checkpoint that `labkit.load_policy` rebuilds: weights, normaliser, config, shapes."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.checkpoint(), path)
        return path
