"""Names of the augment and mix ops, for configs."""
from __future__ import annotations

from .augment import ColorJitter, Cutout, GaussianBlur, Lighting, RandomErasing, RandomGrayscale
from .autoaugment import BatchAutoAugment, BatchRandAugment, BatchTrivialAugmentWide
from tricks.errors import OptionError
from .mix import CutMix, Mixup, Ricap

AUGMENT_OPS = {"jitter": ColorJitter, "lighting": Lighting, "cutout": Cutout,
               "erasing": RandomErasing, "autoaugment": BatchAutoAugment,
               "randaugment": BatchRandAugment, "trivialaugment": BatchTrivialAugmentWide,
               "grayscale": RandomGrayscale, "blur": GaussianBlur}
MIX_OPS = {"mixup": Mixup, "cutmix": CutMix, "ricap": Ricap}


def make_op(kind: str, name: str, **kwargs):
    table = AUGMENT_OPS if kind == "augment" else MIX_OPS
    if name not in table:
        raise OptionError(f"unknown {kind} op {name!r}; known: {', '.join(table)}")
    return table[name](**kwargs)
