"""`Normalizer`: per-feature scaling whose statistics are buffers, so they travel in every checkpoint.

    norm = ds.normalizer()                        # action -> [-1, 1], state/proprio -> zero mean, unit std
    a = norm.normalize("action", actions)         # torch tensors [..., D]
    norm.unnormalize("action", model_output)

Rebuilding from a checkpoint: `Normalizer.from_state_dict(sd)` reads keys, modes and shapes from the
state dict itself (`sd` may be a whole model's state dict with a `prefix`), so nothing else is needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from labkit.data.keys import is_image_feature

MODES = ("min_max", "mean_std", "identity")
EPS = 1e-6  # floor on a feature's half-range / std, so constant features give 0, never inf or NaN
# A feature whose spread (std, or half-range for min_max) is at most CONSTANT_REL of its own magnitude
# (|mean|, or |centre|), or at most EPS, is treated as constant: it normalises to exactly 0 and
# unnormalises to its value. Dividing by such a spread would turn sensor noise the data never showed
# (e.g. 0.002 on Detour's constant goal_y, std 0) into inputs of 1e3-1e6 and wild actions. Every other
# feature is scaled exactly as before (bit for bit); the statistics themselves are unchanged, so old
# checkpoints load as they are.
CONSTANT_REL = 1e-5


def default_mode(key: str, stats: Mapping[str, Any] | None = None) -> str | None:
    """min_max for actions, mean_std for low-dim observations; images and bookkeeping are left out."""
    if key == "action":
        return "min_max"
    if key.startswith("observation.") and not is_image_feature(key):
        return "mean_std"
    return None


def _safe(key: str) -> str:
    return key.replace(".", "__")  # module/buffer names may not contain dots


class _Stats(nn.Module):
    """The four statistics of one feature, as buffers (all kept, so a mode change needs no reshaping)."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        for name, fill in (("min", -1.0), ("max", 1.0), ("mean", 0.0), ("std", 1.0)):
            self.register_buffer(name, torch.full(shape, fill, dtype=torch.float32))


class Normalizer(nn.Module):
    """Maps features to a network-friendly scale and back. Modes per key: "min_max" ([min, max] -> [-1, 1]),
    "mean_std" ((x - mean) / std) or "identity". A constant feature (spread <= max(EPS, CONSTANT_REL *
    magnitude)) maps to exactly 0, whatever noise the input carries, and back to its value, instead of
    producing inf/NaN or amplifying noise a millionfold. NaN inputs stay NaN."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...] | list[int]], modes: Mapping[str, str]):
        super().__init__()
        for key, mode in modes.items():
            if mode not in MODES:
                raise ValueError(f"normalisation mode for {key!r} must be one of {MODES}, got {mode!r}")
        unshaped = [k for k, m in modes.items() if k not in shapes and m != "identity"]
        if unshaped:
            raise ValueError(f"no shape for {unshaped}: only 'identity' keys may go without statistics")
        # identity keys without statistics are allowed (e.g. images a network rescales itself)
        self.modes = {**{k: modes.get(k, "identity") for k in shapes}, **{k: m for k, m in modes.items() if k not in shapes}}
        self.stats = nn.ModuleDict({_safe(k): _Stats(tuple(s)) for k, s in shapes.items()})

    # ---- construction -----------------------------------------------------------------------------
    @classmethod
    def from_stats(cls, stats: Mapping[str, Mapping[str, Any]], modes: Mapping[str, str] | None = None) -> Normalizer:
        """Build from stats.json-style statistics. `modes` overrides the defaults per key; keys with neither
        a given nor a default mode (images, indices) are left out."""
        modes = dict(modes or {})
        chosen = {k: modes.get(k) or default_mode(k) for k in stats}
        chosen = {k: m for k, m in chosen.items() if m is not None}
        chosen.update({k: m for k, m in modes.items() if k not in stats})
        missing = [k for k, m in modes.items() if k not in stats and m != "identity"]
        if missing:
            raise KeyError(f"no statistics for {missing}; available: {sorted(stats)}")
        shapes = {k: np.asarray(stats[k]["mean"]).shape for k in chosen if k in stats}
        norm = cls(shapes, chosen)
        with torch.no_grad():
            for key in shapes:
                buffers = norm.stats[_safe(key)]
                for name in ("min", "max", "mean", "std"):
                    if name in stats[key]:
                        getattr(buffers, name).copy_(torch.as_tensor(np.asarray(stats[key][name], np.float32)))
        return norm

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> Normalizer:
        """Rebuild from a state dict (e.g. a checkpoint's, with prefix "normalizer."): shapes from the
        buffers, keys and modes from the stored extra state."""
        extra = state_dict.get(prefix + "_extra_state")
        if extra is None:
            raise KeyError(f"no '{prefix}_extra_state' in the state dict: it holds no Normalizer at prefix {prefix!r}")
        shapes = {k: tuple(state_dict[f"{prefix}stats.{_safe(k)}.mean"].shape) for k in extra["modes"]
                  if f"{prefix}stats.{_safe(k)}.mean" in state_dict}
        norm = cls(shapes, extra["modes"])
        norm.load_state_dict({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})
        return norm

    def get_extra_state(self) -> dict[str, Any]:
        return {"modes": dict(self.modes)}  # plain strings: loads under torch.load(weights_only=True)

    def set_extra_state(self, state: dict[str, Any]) -> None:
        unknown = set(state["modes"]) - set(self.modes)
        if unknown:
            raise KeyError(f"state dict normalises {sorted(unknown)}, which this Normalizer was not built for")
        self.modes.update(state["modes"])

    # ---- use --------------------------------------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        return key in self.modes

    def _get(self, key: str) -> tuple[str, _Stats | None]:
        if key not in self.modes:
            raise KeyError(f"Normalizer has no feature {key!r}; it knows {sorted(self.modes)}")
        return self.modes[key], (self.stats[_safe(key)] if _safe(key) in self.stats else None)

    def normalize(self, key: str, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Feature `key` (shape [..., *feature_shape]) to the normalised scale."""
        x = _float(x)
        mode, s = self._get(key)
        if mode == "identity":
            return x
        center, scale, const = _affine(mode, s)
        d = x - center.to(x.dtype)
        out = d / scale.to(x.dtype)
        return torch.where(const, d * 0, out)  # d * 0: a NaN input stays NaN; no host sync, no branch

    def unnormalize(self, key: str, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The inverse of `normalize`: back to physical units."""
        x = _float(x)
        mode, s = self._get(key)
        if mode == "identity":
            return x
        center, scale, const = _affine(mode, s)
        out = x * scale.to(x.dtype) + center.to(x.dtype)
        return torch.where(const, x * 0 + center.to(x.dtype), out)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}: {m}" for k, m in self.modes.items())


def _affine(mode: str, s: _Stats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(centre, scale, constant mask) of one feature: normalised = (x - centre) / scale, except where the
    feature is constant (scale <= max(EPS, CONSTANT_REL * |centre|)), which normalises to 0."""
    if mode == "min_max":
        center, spread = (s.max + s.min) / 2, (s.max - s.min) / 2
    else:
        center, spread = s.mean, s.std
    const = spread <= torch.clamp_min(center.abs() * CONSTANT_REL, EPS)
    return center, spread.clamp_min(EPS), const


def _float(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(x)
    return x if x.is_floating_point() else x.float()
