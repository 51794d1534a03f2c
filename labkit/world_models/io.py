"""Checkpoints for world models, as policies have them: `model.save(path)`, and
`labkit.world_models.load_world_model(path)` (in the package, which defines every world model).

A checkpoint holds the class name (one of the registered world models, never arbitrary code), the
constructor's arguments and the weights (with the normalisation buffers), and loads with
`weights_only=True`.
"""

from __future__ import annotations

from pathlib import Path

import torch


class SavedWorldModel:
    """Mixin for a world model (an nn.Module): `save(path)`, with its constructor arguments from
    `init_args()`. Every subclass registers itself by name for `load_world_model`."""

    registry: dict[str, type] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        SavedWorldModel.registry[cls.__name__] = cls

    def init_args(self) -> dict:
        """The keyword arguments that rebuild this model's architecture."""
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"world_model_class": type(self).__name__, "init_args": self.init_args(),
                    "state_dict": self.state_dict()}, path)
        return path
