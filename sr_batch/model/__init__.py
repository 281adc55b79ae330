"""The network and its checkpoints; pure PyTorch, no STAC or Dask."""

from sr_batch.model.checkpoint import (
    DEFAULT_CHECKPOINT,
    LoadedModel,
    ModelInfo,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    untrained_model,
)
from sr_batch.model.highresnet import Architecture, HighResNet, peak_feature_maps, receptive_radius

__all__ = [
    "DEFAULT_CHECKPOINT",
    "Architecture",
    "HighResNet",
    "LoadedModel",
    "ModelInfo",
    "load_checkpoint",
    "peak_feature_maps",
    "receptive_radius",
    "resolve_checkpoint",
    "save_checkpoint",
    "untrained_model",
]
