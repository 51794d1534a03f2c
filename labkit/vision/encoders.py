"""Image encoders, and the observation encoder every policy uses to read images and vectors.

    ConvEncoder       a small conv net, average-pooled (the first pixel encoder labkit had)
    SpatialSoftmax    feature maps -> the expected (x, y) of each map: K keypoints (Levine et al. 2016)
    KeypointEncoder   conv trunk + spatial-softmax keypoints, trained end to end (robomimic /
                      Diffusion Policy's image encoder, with GroupNorm, never BatchNorm: batch
                      statistics differ between training and a robot's single frames)
    PretrainedEncoder a KeypointEncoder that labkit pretrained to read the simulator's state from
                      domain-randomised renders (labkit.vision.pretrain); shipped, loaded frozen
    ObsEncoder        {key: [B, T, ...]} -> one feature vector: vectors flattened, each camera through
                      its image encoder, optionally an MLP over them all

Why each choice (measured in benchmarks/vision.py): ReLU, not Mish (the conv encoder trains 1.5-1.8x
faster with ReLU on a CPU); small images (64 px: 2.5x the steps/s of 96 px); a frozen encoder whose
features are computed once (~8x the steps/s of training the keypoint encoder end to end). Channels-last
memory made no measurable difference here; it is kept because it costs nothing and helps on GPUs.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from labkit.data.keys import env_key, is_image_feature
from labkit.vision.augment import augment, to_float

WEIGHTS = Path(__file__).parent / "weights"  # the shipped pretrained encoders, `<task>_<camera>.pt`
ENCODERS = ("conv", "keypoints", "pretrained")


def spatial_softmax(maps: torch.Tensor, temperature: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Feature maps [N, K, H, W] -> keypoints [N, 2K] ordered (x_1, y_1, x_2, y_2, ...): for each map, a
    softmax over its H*W positions (logits divided by `temperature`) and the expected x (column) and y
    (row) under it, on a grid from -1 to 1. Where a map fires is kept; what fires is left to the
    channel. Differentiable, and sub-pixel."""
    n, k, h, w = maps.shape
    attention = F.softmax(maps.reshape(n, k, h * w) / temperature, dim=-1)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=maps.device),
                            torch.linspace(-1, 1, w, device=maps.device), indexing="ij")
    x = attention @ xs.reshape(-1, 1)  # [N, K, 1]: the expected column
    y = attention @ ys.reshape(-1, 1)
    return torch.cat([x, y], dim=-1).reshape(n, 2 * k)


class SpatialSoftmax(nn.Module):
    """`spatial_softmax` with a learnt temperature. `fn` replaces the function (lesson 11 trains with
    the student's)."""

    def __init__(self, temperature: float = 1.0, fn=None):
        super().__init__()
        self.log_temperature = nn.Parameter(torch.tensor(float(temperature)).log())
        self.fn = fn or spatial_softmax

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.fn(maps, self.log_temperature.exp())


def conv_trunk(channels: int = 16) -> nn.Sequential:
    """64 px -> 16 x 16 maps: two stride-2 stages of two 3x3 convolutions, GroupNorm and ReLU."""
    c = channels
    layers, inp = [], 3
    for out, stride in ((c, 2), (c, 1), (2 * c, 2), (2 * c, 1)):
        layers += [nn.Conv2d(inp, out, 3, stride=stride, padding=1), nn.GroupNorm(8, out), nn.ReLU(inplace=True)]
        inp = out
    return nn.Sequential(*layers)


class ImageEncoder(nn.Module):
    """Base of the encoders: uint8 [N, H, W, 3] in, features [N, out_dim] out; augmentation (random
    shift, and colour jitter when `color`) on the batch in training mode only."""

    out_dim: int
    image_size: int | None = None  # the side the encoder was built for (None: any)

    def __init__(self, augment: bool = True, color: bool = False):
        super().__init__()
        self.augment, self.color = augment, color
        self.shift_fn = None  # None: labkit.vision.random_shift (lesson 11 sets the student's)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> float, refusing a size other than the encoder's (never a silent resize)."""
        x = to_float(images)
        if self.image_size is not None and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"this encoder reads {self.image_size}x{self.image_size} images, got "
                             f"{x.shape[-2]}x{x.shape[-1]}: render or record at that size")
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.prepare(images)
        if self.training and (self.augment or self.color):
            x = augment(x, shift=self.augment, color=self.color, shift_fn=self.shift_fn)
        return self.features(x)


class ConvEncoder(ImageEncoder):
    """Four stride-2 convolutions, average-pooled: where things are is mostly lost in the pooling.
    Mish by default (the success detectors of labkit.rewards); policies build it with ReLU."""

    def __init__(self, out_dim: int = 64, channels: int = 32, augment: bool = True, act: type[nn.Module] = nn.Mish):
        super().__init__(augment)
        c, self.out_dim = channels, out_dim
        self.net = nn.Sequential(
            nn.Conv2d(3, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), act(),
            nn.Conv2d(c, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), act(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * c), act(),
            nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * c), act(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, out_dim),
        )

    def features(self, x):
        return self.net(x)


class KeypointEncoder(ImageEncoder):
    """Conv trunk -> `keypoints` maps -> spatial softmax -> their (x, y) [N, 2 * keypoints]."""

    def __init__(self, keypoints: int = 32, channels: int = 16, augment: bool = True, color: bool = False):
        super().__init__(augment, color)
        self.trunk = conv_trunk(channels)
        self.to_maps = nn.Conv2d(2 * channels, keypoints, 1)
        self.softmax = SpatialSoftmax()
        self.out_dim = 2 * keypoints
        self.to(memory_format=torch.channels_last)

    def keypoint_maps(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_maps(self.trunk(x))

    def features(self, x):
        return self.softmax(self.keypoint_maps(x))


class PretrainedEncoder(KeypointEncoder):
    """A KeypointEncoder with a head that predicts simulator quantities (`targets`, normalised) from
    the image: a state estimator. Its features are those predictions (`outputs`). Built by
    `labkit.vision.pretrain`, loaded with `PretrainedEncoder.load(name)`, and frozen inside policies:
    it never trains there, so its features can be computed once per frame (`precompute`)."""

    def __init__(self, targets: list[str], image_size: int, camera: str, task: str, keypoints: int = 32,
                 channels: int = 16, hidden: int = 128, outputs: str = "predictions"):
        super().__init__(keypoints, channels, augment=True, color=True)
        self.targets, self.image_size, self.camera, self.task = list(targets), int(image_size), camera, task
        self.head = nn.Sequential(nn.Linear(2 * keypoints, hidden), nn.ReLU(), nn.Linear(hidden, len(targets)))
        self.register_buffer("target_mean", torch.zeros(len(targets)))
        self.register_buffer("target_std", torch.ones(len(targets)))
        if outputs not in ("predictions", "keypoints+predictions"):
            raise ValueError(f"outputs must be 'predictions' or 'keypoints+predictions', got {outputs!r}")
        # What a policy reads: by default the predictions alone, a state estimate (few numbers, each with a
        # meaning); "keypoints+predictions" adds the 2 x keypoints coordinates.
        self.outputs = outputs
        self.out_dim = len(targets) + (2 * keypoints if outputs != "predictions" else 0)
        self.variants = 4  # copies per frame `precompute` makes: the clean image and 3 augmented ones
        self.meta = {"targets": self.targets, "image_size": self.image_size, "camera": camera, "task": task,
                     "keypoints": keypoints, "channels": channels, "hidden": hidden, "outputs": outputs}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised target predictions [N, T] from float images (training and probes)."""
        return self.head(super().features(x))

    def features(self, x):
        kp = super().features(x)
        pred = self.head(kp)
        return pred if self.outputs == "predictions" else torch.cat([kp, pred], dim=-1)

    def freeze(self) -> PretrainedEncoder:
        self.requires_grad_(False)
        self.eval()
        return self

    def train(self, mode: bool = True):  # frozen inside a policy: always in eval mode, no augmentation
        return super().train(mode and any(p.requires_grad for p in self.parameters()))

    @torch.no_grad()
    def precompute(self, frames: torch.Tensor, variants: int | None = None, batch: int = 512) -> torch.Tensor:
        """Features of every frame, once: [F, variants, out_dim], variant 0 of the clean image and the
        rest of randomly shifted and colour-jittered copies (the augmentation, computed ahead).
        `variants` defaults to the encoder's `variants` attribute (1: no augmentation)."""
        variants = variants or self.variants
        out = torch.empty(len(frames), variants, self.out_dim)
        for i in range(0, len(frames), batch):
            x = self.prepare(frames[i:i + batch])
            out[i:i + batch, 0] = self.features(x)
            for v in range(1, variants):
                out[i:i + batch, v] = self.features(augment(x, shift=True, color=True, shift_fn=self.shift_fn))
        return out

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        torch.save({"meta": self.meta, "state_dict": self.state_dict()}, path)
        return path

    @classmethod
    def load(cls, name_or_path: str | Path) -> PretrainedEncoder:
        """A shipped encoder by name (`arm_top`, `arm_wrist`, `pusht_top`: labkit/vision/weights) or a
        file, loaded as weights only (no pickled code runs), frozen."""
        path = Path(name_or_path)
        if not path.suffix:
            path = WEIGHTS / f"{name_or_path}.pt"
        if not path.exists():
            shipped = sorted(p.stem for p in WEIGHTS.glob("*.pt"))
            raise FileNotFoundError(f"no pretrained encoder {str(name_or_path)!r} ({path}); shipped: {shipped}. "
                                    "Rebuild one with `python -m labkit.vision.pretrain`.")
        blob = torch.load(path, map_location="cpu", weights_only=True)
        try:
            enc = cls(**blob["meta"])
            enc.load_state_dict(blob["state_dict"])
        except (KeyError, TypeError, RuntimeError) as e:
            raise ValueError(f"{path} is not a labkit pretrained encoder: {e}") from e
        return enc.freeze()


def pretrained_name(task: str, key: str) -> str:
    """The shipped encoder for camera feature `key` of `task`: `arm` + observation.images.wrist -> arm_wrist."""
    camera = env_key(key)
    return f"{task}_{'top' if camera == 'pixels' else camera}"


def pretrained_meta(task: str, keys: list[str]) -> dict[str, dict]:
    """{camera feature: the architecture of its shipped encoder}: what a policy keeps in its config, so
    that its checkpoint rebuilds without the weight files (the weights travel in the checkpoint)."""
    return {k: PretrainedEncoder.load(pretrained_name(task, k)).meta for k in keys}


def image_encoder(kind: str, key: str, image_dim: int = 64, pretrained: str | None = None,
                  meta: dict | None = None) -> ImageEncoder:
    """The image encoder a policy's config asks for, for the camera feature `key` (for "pretrained":
    built from `meta` when given, weights to come from a checkpoint; else loaded from the shipped file)."""
    if kind == "conv":
        return ConvEncoder(image_dim, act=nn.ReLU)
    if kind == "keypoints":
        return KeypointEncoder(keypoints=image_dim // 2)
    if kind == "pretrained":
        if not pretrained:
            raise ValueError("image_encoder='pretrained' needs `pretrained`, the task the encoder was trained "
                             "on (e.g. 'arm', 'pusht')")
        path = WEIGHTS / f"{pretrained_name(pretrained, key)}.pt"
        if meta is None or path.exists():
            shipped = PretrainedEncoder.load(path)
            if meta is None or shipped.meta == meta:
                return shipped  # the trained weights (a checkpoint's own, if any, are loaded over them)
        # rebuilt from a checkpoint whose encoder is not (or no longer) shipped: its weights come with it
        return PretrainedEncoder(**meta).freeze()
    raise ValueError(f"image_encoder must be one of {ENCODERS}, got {kind!r}")


class ObsEncoder(nn.Module):
    """Normalised observation history {key: [B, T, ...]} -> features [B, out_dim].

    Vector keys are flattened over time; each camera has its own image encoder, applied per frame.
    A camera's input may also be its features, already computed ([B, T, D] float: a frozen encoder's
    `precompute`), which is how a policy with a frozen encoder trains at the speed of a state policy.
    """

    def __init__(self, shapes: dict[str, list[int]], obs_horizon: int, image_dim: int = 64,
                 image_encoder_kind: str = "conv", pretrained: str | None = None, meta: dict | None = None,
                 mlp_layers: int = 0, mlp_width: int = 256, act: type[nn.Module] = nn.SiLU):
        super().__init__()
        self.keys = sorted(shapes)
        self.image_keys = [k for k in self.keys if is_image_feature(k)]
        self.vector_keys = [k for k in self.keys if k not in self.image_keys]
        self.obs_horizon = obs_horizon
        if image_encoder_kind == "conv" and len(self.image_keys) <= 1:  # the original layout (old checkpoints)
            self.image = ConvEncoder(image_dim, act=nn.ReLU) if self.image_keys else None
            self.images = None
        else:
            self.image = None
            meta = meta or {}
            self.images = nn.ModuleDict({k.replace(".", "_"): image_encoder(image_encoder_kind, k, image_dim, pretrained,
                                                                            meta.get(k))
                                         for k in self.image_keys})
        self.out_dim = obs_horizon * (sum(shapes[k][0] for k in self.vector_keys)
                                      + sum(self.encoder(k).out_dim for k in self.image_keys))
        # Optional MLP over all the features together (then LayerNorm): a FiLM denoiser reads its input only
        # through a linear map per block, so products of the inputs (where the named block is, seen from the
        # robot) must be built here. Absent (mlp_layers=0) the features pass as they are (old checkpoints).
        self.mlp = None
        if mlp_layers:
            layers: list[nn.Module] = []
            for i in range(mlp_layers):
                layers += [nn.Linear(self.out_dim if i == 0 else mlp_width, mlp_width), act()]
            self.mlp, self.out_dim = nn.Sequential(*layers, nn.LayerNorm(mlp_width)), mlp_width

    def encoder(self, key: str) -> ImageEncoder:
        return self.image if self.images is None else self.images[key.replace(".", "_")]

    def frozen(self, key: str) -> bool:
        enc = self.encoder(key)
        return not any(p.requires_grad for p in enc.parameters())

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        feats = []
        for k in self.vector_keys:
            feats.append(obs[k].flatten(1))
        for k in self.image_keys:
            x = obs[k]
            if x.dtype == torch.uint8:  # images [B, T, H, W, 3]
                feats.append(self.encoder(k)(x.flatten(0, 1)).view(x.shape[0], -1))
            else:  # features computed ahead [B, T, D]
                feats.append(x.flatten(1).float())
        out = torch.cat(feats, dim=-1)
        return out if self.mlp is None else self.mlp(out)
