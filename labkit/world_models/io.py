"""Checkpoints for world models, as policies have them: `model.save(path)` and `load_world_model(path)`.

A checkpoint holds the class name (one of the registered world models, never arbitrary code), the
constructor's arguments and the weights (with the normalisation buffers), and loads with
`weights_only=True`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from labkit.training import read_checkpoint


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


def load_world_model(path: str | Path, map_location: str | torch.device = "cpu"):
    """Rebuild a world model saved with `.save(path)`, in eval mode."""
    import labkit.world_models  # noqa: F401  (defines, and so registers, every world model)

    ckpt = read_checkpoint(path, "world-model checkpoint", map_location)
    name = ckpt.get("world_model_class")
    if name not in SavedWorldModel.registry:
        raise ValueError(f"{path} is not a labkit world-model checkpoint (class {name!r}; "
                         f"known: {sorted(SavedWorldModel.registry)})")
    model = SavedWorldModel.registry[name](**ckpt["init_args"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
