"""Models (pure PyTorch, no Ray): a registry of architectures that take [0, 1] pixels, and checkpoints.

``build_model(name, num_classes, dataset)`` returns ``nn.Sequential(NormalizeLayer(mean, std), net)``;
``save_model_checkpoint`` / ``load_model_checkpoint`` store and restore it (weights-only files).
"""

from adre_ray.models import cifar_resnet, small_cnn, torchvision_models  # noqa: F401  (register models)
from adre_ray.models.checkpoint import (
    CHECKPOINT_FILENAME,
    FORMAT,
    checkpoint_file,
    load_model_checkpoint,
    read_checkpoint,
    save_model_checkpoint,
    strip_wrapper_prefixes,
    unwrap_model,
)
from adre_ray.models.cifar_resnet import CifarResNet
from adre_ray.models.normalize import NormalizedModel, NormalizeLayer
from adre_ray.models.registry import available_models, build_model, check_model_name, register_model
from adre_ray.models.small_cnn import SmallCNN

MODEL_NAMES: tuple[str, ...] = available_models()
"""The built-in models: cifar_resnet20, cifar_resnet110, resnet50, small_cnn."""

__all__ = [
    "CHECKPOINT_FILENAME",
    "FORMAT",
    "MODEL_NAMES",
    "CifarResNet",
    "NormalizeLayer",
    "NormalizedModel",
    "SmallCNN",
    "available_models",
    "build_model",
    "check_model_name",
    "checkpoint_file",
    "load_model_checkpoint",
    "read_checkpoint",
    "register_model",
    "save_model_checkpoint",
    "small_cnn",
    "strip_wrapper_prefixes",
    "unwrap_model",
]
