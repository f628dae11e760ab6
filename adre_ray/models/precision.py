"""Final-layer logits in float32 under bf16 autocast.

With 1,000 classes, logits rounded to bf16 (8 significant bits) tie exactly quite often, and ``argmax``
gives a tie to the lowest class index: a valid but biased base classifier. ``fp32_logits(model)`` makes
the model's last ``nn.Linear`` (in module order: the classifier head of every model here) compute in
float32 whatever autocast says, so the rest of the network keeps bf16 speed and the head, a tiny share
of the FLOPs, gives full-precision logits. The weights and the state dict are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


class Float32Linear(nn.Linear):
    """``nn.Linear`` that runs in float32 with autocast switched off (same parameters and state dict)."""

    float32_output = True
    """Read by ``adre_ray.smoothing.affine_fold`` (which cannot import models): its dense layer for this
    module computes in float32 under autocast too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return nn.functional.linear(x.float(), self.weight.float(),
                                        None if self.bias is None else self.bias.float())


def fp32_logits(model: nn.Module) -> nn.Module:
    """``model`` with its last ``nn.Linear`` turned into a ``Float32Linear`` in place (returned for
    chaining); a model without a Linear layer is returned unchanged."""
    linears = [module for module in model.modules() if type(module) in (nn.Linear, Float32Linear)]
    if linears:
        linears[-1].__class__ = Float32Linear
    return model


__all__ = ["Float32Linear", "fp32_logits"]
