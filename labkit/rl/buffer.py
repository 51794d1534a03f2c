"""Replay buffers for off-policy RL: a preallocated ring of torch tensors, and RLPD's offline/online mix.

A buffer stores named fields, each of a fixed per-transition shape. A field may also be a dict of
shapes (a `Dict` observation such as {"state": (6,), "proprio": (4,)}): it is stored as one tensor
per key and comes back as a dict. Everything is preallocated, so memory use is known up front and
`add` never reallocates; once full, the oldest transitions are overwritten first.

The usual fields (`transition_fields`) follow one contract that every method shares:
    y = reward + discount * Q̄(next_obs, a')
where `reward` is the (n-step or chunk) discounted return and `discount` already folds in gamma**k and
the terminal mask (see labkit.rl.returns). A time-limit truncation keeps discount > 0: it is not a
terminal state, so its value is still bootstrapped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

Shape = tuple[int, ...]
Spec = Shape | tuple[Shape, torch.dtype]  # a shape (stored as float32), or (shape, dtype)
FieldSpec = Spec | Mapping[str, Spec]  # a tensor field, or a dict field (e.g. a Dict observation)


def transition_fields(obs_shapes: Shape | Mapping[str, Shape], action_shape: Shape | int) -> dict[str, FieldSpec]:
    """The standard fields: obs, action, reward, next_obs, discount (= gamma**k * (1 - terminated))."""
    action_shape = (action_shape,) if isinstance(action_shape, int) else tuple(action_shape)
    return {"obs": obs_shapes, "action": action_shape, "reward": (), "next_obs": obs_shapes, "discount": ()}


def flatten_obs(obs: Mapping[str, torch.Tensor] | torch.Tensor, keys: list[str] | None = None) -> torch.Tensor:
    """A dict observation as one [B, D] tensor (keys in sorted order unless given), for MLP actors/critics."""
    if isinstance(obs, torch.Tensor):
        return obs.flatten(1)
    keys = sorted(obs) if keys is None else keys
    return torch.cat([obs[k].flatten(1).float() for k in keys], dim=-1)


def _parse(spec: Spec) -> tuple[Shape, torch.dtype]:
    if len(spec) == 2 and isinstance(spec[1], torch.dtype):
        return tuple(spec[0]), spec[1]
    return tuple(spec), torch.float32


def _to_tensor(value: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(value, np.ndarray) or not isinstance(value, torch.Tensor):
        value = torch.as_tensor(np.asarray(value))
    return value.to(device=device, dtype=dtype)


class ReplayBuffer:
    """A fixed-capacity ring of transitions, stored as preallocated torch tensors.

        buf = ReplayBuffer(100_000, transition_fields({"state": (6,), "proprio": (4,)}, 2))
        buf.add({"obs": {...: [B, 6], ...}, "action": [B, 2], "reward": [B], ...})
        batch = buf.sample(256, generator)   # same structure, every tensor [256, ...]
    """

    def __init__(self, capacity: int, fields: Mapping[str, FieldSpec], device: str | torch.device = "cpu"):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not fields:
            raise ValueError("a buffer needs at least one field, e.g. transition_fields(obs_shapes, action_dim)")
        self.capacity, self.device = int(capacity), torch.device(device)
        self.fields = dict(fields)
        self.storage: dict[str, torch.Tensor | dict[str, torch.Tensor]] = {}
        for name, spec in self.fields.items():
            if isinstance(spec, Mapping):
                self.storage[name] = {k: self._alloc(_parse(s)) for k, s in spec.items()}
            else:
                self.storage[name] = self._alloc(_parse(spec))
        self.ptr = 0  # where the next transition goes
        self.size = 0  # how many slots hold data

    def _alloc(self, parsed: tuple[Shape, torch.dtype]) -> torch.Tensor:
        shape, dtype = parsed
        return torch.zeros((self.capacity, *shape), dtype=dtype, device=self.device)

    def __len__(self) -> int:
        return self.size

    def _items(self, batch: Mapping[str, Any]):
        """(path, stored tensor, given value) for every leaf; checks that the batch has exactly our fields."""
        if set(batch) != set(self.storage):
            missing, extra = sorted(set(self.storage) - set(batch)), sorted(set(batch) - set(self.storage))
            raise KeyError(f"batch fields do not match the buffer's: missing {missing}, unexpected {extra}")
        for name, store in self.storage.items():
            if isinstance(store, dict):
                value = batch[name]
                if not isinstance(value, Mapping) or set(value) != set(store):
                    got = sorted(value) if isinstance(value, Mapping) else type(value).__name__
                    raise KeyError(f"field {name!r} must be a dict with keys {sorted(store)}, got {got}")
                for k, t in store.items():
                    yield f"{name}[{k!r}]", t, value[k]
            else:
                yield name, store, batch[name]

    def add(self, batch: Mapping[str, Any]) -> None:
        """Append a batch of transitions: every leaf has shape [B, *field_shape] (numpy or torch)."""
        leaves = [(path, t, _to_tensor(v, t.dtype, self.device)) for path, t, v in self._items(batch)]
        sizes = {v.shape[0] if v.dim() else None for _, _, v in leaves}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(f"every field needs the same leading batch size; got {sorted(map(str, sizes))}")
        for path, t, v in leaves:
            if v.shape[1:] != t.shape[1:]:
                want = ", ".join(["B", *map(str, t.shape[1:])])
                raise ValueError(f"field {path} must have shape [{want}] (batch first), got {list(v.shape)}")
        n = sizes.pop()
        if n == 0:
            return
        # A batch larger than the buffer: only its newest `capacity` transitions can survive anyway.
        start = max(0, n - self.capacity)
        idx = (self.ptr + torch.arange(start, n, device=self.device)) % self.capacity
        for _, t, v in leaves:
            t[idx] = v[start:]
        self.ptr = (self.ptr + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def get(self, idx: torch.Tensor) -> dict[str, Any]:
        """The transitions at slot indices `idx`, in the buffer's structure."""
        return {name: ({k: t[idx] for k, t in s.items()} if isinstance(s, dict) else s[idx])
                for name, s in self.storage.items()}

    def state_dict(self) -> dict:
        """The filled slots (in slot order) with the write position: what a resumed run needs, without
        the empty rest of a preallocated ring."""
        return {"capacity": self.capacity, "ptr": self.ptr, "size": self.size,
                "data": self.get(torch.arange(self.size, device=self.device))}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Refill from `state_dict()` of a buffer with the same capacity and fields."""
        if state["capacity"] != self.capacity:
            raise ValueError(f"saved buffer has capacity {state['capacity']}, this one {self.capacity}: "
                             "keep buffer_size as it was when the checkpoint was written")
        size = int(state["size"])
        for path, t, v in self._items(state["data"]):
            v = _to_tensor(v, t.dtype, self.device)
            if v.shape != (size, *t.shape[1:]):
                raise ValueError(f"saved field {path} has shape {list(v.shape)}, expected [{size}, "
                                 f"{', '.join(map(str, t.shape[1:]))}]")
            t[:size] = v
        self.ptr, self.size = int(state["ptr"]), size

    def sample(self, n: int, generator: torch.Generator | None = None) -> dict[str, Any]:
        """`n` transitions drawn uniformly with replacement (as RLPD/SAC do), seeded by `generator`."""
        if self.size == 0:
            raise RuntimeError("cannot sample from an empty replay buffer: add transitions first "
                               "(e.g. collect warm-up steps before the first update)")
        if n < 1:
            raise ValueError(f"sample size must be >= 1, got {n}")
        # Draw on the generator's device (a CPU generator cannot draw CUDA tensors), then move.
        device = generator.device if generator is not None else torch.device("cpu")
        idx = torch.randint(0, self.size, (n,), generator=generator, device=device).to(self.device)
        return self.get(idx)


def concat_batches(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Concatenate two sampled batches of the same structure along the batch dimension."""
    return {k: (concat_batches(v, b[k]) if isinstance(v, Mapping) else torch.cat([v, b[k]])) for k, v in a.items()}


class MixedSampler:
    """RLPD's symmetric sampling: each batch takes exactly round(ratio * n) transitions from the offline
    (demonstration) buffer and the rest from the online one, so demos never get diluted as online
    data grows. The offline part comes first in the returned batch."""

    def __init__(self, offline: ReplayBuffer, online: ReplayBuffer, ratio: float = 0.5):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"offline ratio must lie in [0, 1], got {ratio}")
        if offline.fields != online.fields:
            raise ValueError(f"offline and online buffers must have the same fields; got {offline.fields} "
                             f"and {online.fields}")
        self.offline, self.online, self.ratio = offline, online, float(ratio)

    def split(self, n: int) -> tuple[int, int]:
        """How many of `n` come from (offline, online)."""
        n_off = round(self.ratio * n)
        return n_off, n - n_off

    def sample(self, n: int, generator: torch.Generator | None = None) -> dict[str, Any]:
        n_off, n_on = self.split(n)
        if n_off and len(self.offline) == 0:
            raise RuntimeError("the offline buffer is empty: load demonstrations into it, or use ratio=0")
        if n_on and len(self.online) == 0:
            raise RuntimeError("the online buffer is empty: collect some env steps before updating, "
                               "or use ratio=1 (offline only) until it has data")
        parts = [buf.sample(k, generator) for buf, k in ((self.offline, n_off), (self.online, n_on)) if k]
        return parts[0] if len(parts) == 1 else concat_batches(*parts)
