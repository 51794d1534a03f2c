"""Eyes: the image pipeline and encoders labkit's pixel policies use (see encoders.py and augment.py),
the pretraining of the shipped frozen encoders (pretrain.py), and PushT seen through the encoder's
estimate of the block (estimate.py)."""

from labkit.vision.augment import augment, color_jitter, random_shift, to_float
from labkit.vision.encoders import (
    ENCODERS,
    ConvEncoder,
    ImageEncoder,
    KeypointEncoder,
    ObsEncoder,
    PretrainedEncoder,
    SpatialSoftmax,
    image_encoder,
)

__all__ = ["ENCODERS", "ConvEncoder", "ImageEncoder", "KeypointEncoder", "ObsEncoder", "PretrainedEncoder",
           "SpatialSoftmax", "augment", "color_jitter", "image_encoder", "random_shift", "to_float"]
