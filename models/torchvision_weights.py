"""Loading saved weights (torchvision ResNet state dicts, or our own) into a model of ours, whole
or, for fine-tuning to another class count, all but the classifier."""
from __future__ import annotations

import torch
from torch import nn

TORCHVISION_HINT = "torchvision's resnet50/101/152 are our resnet50b/101b/152b"


def classifier_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of ``model``'s classifier: its last ``nn.Linear`` (``fc`` in a
    ResNet, ``classifier.1`` in torchvision's MobileNet-V2); none without one."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        return []
    prefix = f"{last}." if last else ""
    return [prefix + k for k in model.get_submodule(last).state_dict()]


def _listed(keys: list[str]) -> str:
    return f"{', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}"


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True,
                 hint: str = "") -> list[str]:
    """Load ``state_dict`` into ``model`` after checking that it fits.

    With ``strict`` every key and shape must match. With ``strict=False`` the classifier
    (``classifier_keys``) may have another shape, e.g. ImageNet's 1,000 classes into a 3-class
    model: it is left out and keeps its initialization, and everything else must still match.

    Returns the keys left out (empty when everything was loaded). Raises ``ValueError`` naming
    the keys that are missing, unexpected or of another shape; when only the classifier's shape
    differs, the message says so and names ``model.weights_strict=false``; ``hint`` is added to
    any other mismatch.
    """
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(ours))
    shapes = sorted(k for k in set(ours) & set(state_dict) if ours[k].shape != state_dict[k].shape)
    head = classifier_keys(model)
    head_only = bool(shapes) and set(shapes) <= set(head) and not (missing or unexpected)
    if head_only and not strict:
        model.load_state_dict({k: v for k, v in state_dict.items() if k not in shapes},
                              strict=False)
        return [k for k in head if k in shapes]  # the model's order: weight, then bias
    if head_only:
        w = head[0]
        raise ValueError(f"the weights' classifier {w} has {state_dict[w].shape[0]} outputs, "
                         f"this model {ours[w].shape[0]} classes; set "
                         "model.weights_strict=false to load everything else (the classifier "
                         "then starts from its initialization)")
    if missing or unexpected or shapes:
        detail = "; ".join(f"{what}: {_listed(keys)}"
                           for what, keys in (("missing", missing), ("unexpected", unexpected),
                                              ("shape differs", shapes)) if keys)
        raise ValueError(f"the weights do not match this model ({detail})"
                         f"{'; ' + hint if hint else ''}")
    model.load_state_dict(state_dict)
    return []


def load_torchvision_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor],
                                strict: bool = True) -> list[str]:
    """Load a torchvision ``resnet*`` state dict (``load_weights``). Module names match ours for
    the variants torchvision builds (resnet18/34, and our ``*b`` for bottlenecks), so a missing,
    unexpected or mis-shaped key outside the classifier means the variant does not match: the
    error names them and says which of ours is torchvision's."""
    return load_weights(model, state_dict, strict, TORCHVISION_HINT)
