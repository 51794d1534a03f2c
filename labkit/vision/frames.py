"""The frame cache: a dataset's camera frames decoded once into memory (uint8), gathered per batch.

Training windows repeat every frame `obs_horizon` times; gathering them up front would copy every image
that often (at 2 frames, 64 px and two cameras, 0.94 GB for the 19k-frame arm dataset instead of 0.47).
A `FrameTable` keeps one copy of the frames and gathers a minibatch's windows when it is drawn.
With a frozen encoder it holds the frames' features instead ([F, variants, D]: the clean frame and
augmented copies, computed once), and each window draws one variant per frame.
"""

from __future__ import annotations

import torch


class FrameTable:
    """`table[idx]` -> frames[index[idx]]: [B, T, ...] for window indices idx [B]. `len` = windows."""

    def __init__(self, frames: torch.Tensor, index: torch.Tensor, variants: bool = False):
        self.frames, self.index, self.variants = frames, torch.as_tensor(index).long(), variants
        if self.index.ndim != 2:
            raise ValueError(f"index must be [windows, obs_horizon], got shape {tuple(self.index.shape)}")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx) -> torch.Tensor:
        rows = self.index[idx]
        if not self.variants:
            return self.frames[rows]
        pick = torch.randint(0, self.frames.shape[1], rows.shape)  # one augmentation per frame
        return self.frames[rows, pick]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), self.index.shape[1], *self.frames.shape[1 + self.variants:])
