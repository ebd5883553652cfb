"""The trick stack the benchmarks time: the augment and mix ops of the presets baseline,
efficient and refined (He et al. 2018: colour jitter and PCA lighting, §2.1; mixup α = 0.2, §5.4),
with random erasing added (Zhong et al. 2017, the target's full augment list), built by the
trainer's own ``build_ops`` so a benchmark times what ``tricks train`` runs."""
from __future__ import annotations

from tricks.train.config import load_config, preset_path
from tricks.train.data import build_ops

PRESETS = ("baseline", "efficient", "refined")
EXTRA = ("augment.ops=[jitter, lighting, erasing]",)


def trick_stack() -> tuple[list, object]:
    """(augment ops, mix op) of ``PRESETS`` with ``EXTRA`` applied (``tricks.pipeline`` ops)."""
    return build_ops(load_config([preset_path(p) for p in PRESETS], list(EXTRA)))
