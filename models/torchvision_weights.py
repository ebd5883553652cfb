"""Loading torchvision ResNet weights into the matching variant of ours."""
from __future__ import annotations

import torch
from torch import nn


def load_torchvision_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a torchvision ``resnet*`` state dict. Module names match ours for the variants
    torchvision builds (resnet18/34, and our ``*b`` for bottlenecks), so any missing,
    unexpected or mis-shaped key means the variant does not match: that is an error naming it."""
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(ours))
    shapes = [k for k in set(ours) & set(state_dict) if ours[k].shape != state_dict[k].shape]
    if missing or unexpected or shapes:
        detail = "; ".join(f"{what}: {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}"
                           for what, keys in (("missing", missing), ("unexpected", unexpected),
                                              ("shape differs", sorted(shapes))) if keys)
        raise ValueError(f"torchvision weights do not match this model ({detail}); "
                         "torchvision's resnet50/101/152 are our resnet50b/101b/152b")
    model.load_state_dict(state_dict)
