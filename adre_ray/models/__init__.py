"""Models (pure PyTorch, no Ray): a registry of architectures that take [0, 1] pixels, and checkpoints.

``build_model(name, num_classes, dataset)`` returns ``nn.Sequential(NormalizeLayer(mean, std), net)``;
``save_model_checkpoint`` / ``load_model_checkpoint`` store and restore it (weights-only files).
``MODEL_NAMES`` is asked of the registry each time it is read (models registered later included).
Names are imported on first use (``adre_ray.lazy``): ``adre_ray.models.formats`` imports without torch.
"""

from typing import Any

from adre_ray.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("CHECKPOINT_FILENAME", "FORMAT", "checkpoint_file", "load_model_checkpoint",
                     "read_checkpoint", "save_model_checkpoint", "strip_wrapper_prefixes", "unwrap_model"),
                    "checkpoint"),
    "CifarResNet": "cifar_resnet",
    "IMPORT_FORMATS": "formats",
    **dict.fromkeys(("NormalizeLayer", "NormalizedModel"), "normalize"),
    **dict.fromkeys(("available_models", "build_model", "check_model_name", "register_model"), "registry"),
    "SmallCNN": "small_cnn",
}
_lazy_getattr, __dir__ = lazy_exports(__name__, _EXPORTS)


def __getattr__(name: str) -> Any:
    if name == "MODEL_NAMES":  # live, never cached: the registered names now
        from adre_ray.models.registry import available_models

        return available_models()
    return _lazy_getattr(name)


__all__ = sorted([*_EXPORTS, "MODEL_NAMES", "small_cnn"])
