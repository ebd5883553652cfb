"""Typed configuration: dataclass defaults ← YAML presets (in order) ← ``key=value`` overrides.

An unknown key or a value of the wrong type is an error naming the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tricks.errors import ConfigError
from tricks.pipeline.ops import AUGMENT_OPS, MIX_OPS
from tricks.pipeline.options import DEFAULT_CROP_RATIO, DEFAULT_RATIO, DEFAULT_SCALE
from tricks.pipeline.translate import PAD_MODES


@dataclass
class DataConfig:
    path: str | None = None          # converted folder or ImageFolder tree; None: embedded demo
    train_split: str = "train"
    val_split: str | None = None     # None: the first of val, validation, test that exists
    engine: str = "native"           # native | dali | ffcv
    engine_options: dict = field(default_factory=dict)  # the engine's own knobs (native:
    #                                  cpu_decoder, fast_dct; DALI: hw_decoder_load; FFCV: order)
    decode: str = "auto"             # auto | workers (CPU processes) | device (nvJPEG on CUDA)
    workers: int | None = None       # decode processes; None: one per core, at most 16
    prefetch: int = 2                # batches prepared ahead
    image_size: int = 224
    val_image_size: int | None = None
    crop_ratio: float = DEFAULT_CROP_RATIO  # validation: resize to size/crop_ratio, centre-crop
    crop: str = "random_resized"     # random_resized (scale, ratio) | pad (pad-and-crop, small images)
    pad: int = 4                     # pad-and-crop: shift of up to ±pad pixels each way
    pad_fill: int = 0                # pad-and-crop: uint8 level outside the image (0: black)
    pad_mode: str = "constant"       # pad-and-crop: constant (pad_fill) | edge | reflect | symmetric
    scale: list = field(default_factory=lambda: list(DEFAULT_SCALE))
    ratio: list = field(default_factory=lambda: list(DEFAULT_RATIO))
    max_side: int | None = None      # when a folder tree is converted on the fly
    quality: int = 90
    progressive: list = field(default_factory=list)  # [[epoch, size], …]: train size from epoch
    on_bad_record: str = "stop"      # stop | skip (substituted, counted, named once)
    bad_record_budget: int = 100     # skip: the run stops past this many bad records


@dataclass
class AugmentConfig:
    ops: list = field(default_factory=list)  # in order, of pipeline.ops.AUGMENT_OPS: jitter
    #                                  lighting cutout erasing autoaugment randaugment
    #                                  trivialaugment grayscale blur
    brightness: float = 0.4          # jitter: factors in [1 − b, 1 + b] (the paper: 0.4)
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.0                 # jitter: shift in [−h, h] of a turn
    jitter_random_order: bool = False
    lighting_std: float = 0.1        # PCA lighting: α ~ N(0, σ)
    cutout_holes: int = 1
    cutout_size: int = 16            # side of each hole, pixels
    cutout_p: float = 1.0
    erasing_p: float = 0.5
    erasing_area: list = field(default_factory=lambda: [0.02, 0.4])
    erasing_ratio: float = 0.3       # aspect in [r1, 1/r1]
    erasing_fill: str = "random"     # random | mean | zero
    autoaugment_policy: str = "imagenet"
    randaugment_ops: int = 2         # RandAugment: ops per image (torchvision's default)
    randaugment_magnitude: int = 9   # RandAugment: bin of 31 (torchvision's default)
    grayscale_p: float = 0.1         # random grayscale: probability (torchvision's default)
    blur_kernel: int = 9             # Gaussian blur: odd kernel side, pixels
    blur_sigma: list = field(default_factory=lambda: [0.1, 2.0])  # σ range (torchvision's)
    blur_p: float = 0.5              # Gaussian blur: probability per image (SimCLR's)


@dataclass
class MixConfig:
    name: str = "none"               # none | mixup | cutmix | ricap
    alpha: float = 0.2               # mixup's Beta(α, α)
    per_sample: bool = False         # mixup: one λ per sample instead of per batch
    cutmix_alpha: float = 1.0
    ricap_beta: float = 0.3
    off_last_epochs: int = 0         # no mixing in the last k epochs


@dataclass
class ModelConfig:
    name: str = "resnet50d"
    width: int = 64
    cifar_stem: bool = False
    zero_init_last: bool = False
    init: str = "xavier"             # xavier (the paper) | torchvision
    weights: str | None = None       # a torchvision state dict or one of our checkpoints
    weights_strict: bool = True      # false: load all but a classifier of another class count


@dataclass
class TeacherConfig:
    checkpoint: str | None = None    # our checkpoint, or a torchvision state dict (name `model`)
    model: str | None = None         # None: the checkpoint's own model
    temperature: float = 20.0        # the paper's T
    weight: float = 1.0              # w in CE + w·T²·CE(teacher/T, student/T)


@dataclass
class OptimConfig:
    name: str = "sgd"                # sgd (Nesterov momentum) | adabound | amsbound
    lr: float = 0.1                  # for a batch of 256; scaled by lr_scaling
    lr_scaling: str = "linear"       # linear: lr × batch / 256 | none
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    no_bias_decay: bool = False      # exclude every 1-D parameter (biases, BN γ and β)
    final_lr: float = 0.1            # AdaBound: the SGD-like LR the bounds converge to
    gamma: float = 1e-3              # AdaBound: how fast the bounds close
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    fused: bool = False              # SGD: one fused kernel for the whole update


@dataclass
class ScheduleConfig:
    name: str = "cosine"             # cosine | linear | step
    warmup_epochs: float = 0.0
    step_epochs: list = field(default_factory=lambda: [30, 60, 90])
    step_gamma: float = 0.1


@dataclass
class TrainConfig:
    epochs: int = 120
    batch: int = 256                 # the global batch
    precision: str = "fp32"          # fp32 | fp16 (autocast + scaler, CUDA) | bf16
    channels_last: bool = True
    label_smoothing: float = 0.0
    seed: int = 0
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    accumulate: int = 1              # micro-batches per optimizer step (batch stays the total)
    sync_bn: bool = False            # SyncBatchNorm across GPUs (CUDA only)
    ema_decay: float = 0.0           # EMA of the weights, evaluated beside them; 0: off
    compile: bool = False            # torch.compile the model (first steps are slow)
    compile_mode: str = "default"    # torch.compile mode; reduce-overhead adds CUDA graphs
    cudnn_benchmark: bool = True     # let cuDNN time its algorithms for each new input shape
    checkpoint_every: int = 0        # iterations between mid-epoch checkpoints; 0: epoch ends only
    log_every: int = 20              # iterations between reading metrics back from the device
    tensorboard: bool = True         # TensorBoard events in the run dir (when it is installed)
    eval_every: int = 1              # epochs
    out: str = "runs"
    name: str | None = None          # run folder name; None: a timestamp


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _keys(cfg: Config) -> list[str]:
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(cfg)
            for f in dataclasses.fields(getattr(cfg, s.name))]


def _check_type(key: str, default: Any, value: Any) -> Any:
    if value is None or default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
    elif isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if isinstance(default, float):
            value = float(value)
        elif isinstance(value, float):
            if not value.is_integer():
                raise ConfigError(f"{key} must be an integer, got {value!r}")
            value = int(value)
    elif isinstance(default, dict) and not isinstance(value, dict):
        raise ConfigError(f"{key} must be a mapping, got {value!r}")
    elif isinstance(default, list) and not isinstance(value, list):
        raise ConfigError(f"{key} must be a list, got {value!r}")
    elif isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def set_key(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) != 2 or key not in _keys(cfg):
        close = difflib.get_close_matches(key, _keys(cfg), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown config key {key!r}{hint}")
    section = getattr(cfg, parts[0])
    default = getattr(section, parts[1])
    setattr(section, parts[1], _check_type(key, default, value))


def apply_dict(cfg: Config, data: dict, source: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections")
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        for k, v in values.items():
            try:
                set_key(cfg, f"{section}.{k}", v)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None


def load_config(files: list[str | Path] = (), overrides: list[str] = (),
                base: dict | None = None) -> Config:
    """Defaults (or ``base``, a saved config), then each YAML file in order, then
    ``section.key=value`` overrides."""
    cfg = Config()
    if base is not None:
        apply_dict(cfg, base, "saved config")
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        apply_dict(cfg, data, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        set_key(cfg, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    validate(cfg)
    return cfg


_CHOICES = {
    "data.crop": ("random_resized", "pad"),
    "data.pad_mode": PAD_MODES,
    "data.decode": ("auto", "workers", "device"),
    "data.on_bad_record": ("stop", "skip"),
    "model.init": ("xavier", "torchvision"),
    "mix.name": ("none", *MIX_OPS),
    "optim.name": ("sgd", "adabound", "amsbound"),
    "optim.lr_scaling": ("linear", "none"),
    "schedule.name": ("cosine", "linear", "step"),
    "train.precision": ("fp32", "fp16", "bf16"),
    "train.compile_mode": ("default", "reduce-overhead", "max-autotune",
                           "max-autotune-no-cudagraphs"),
}


# torch.compile modes that replay CUDA graphs (torch._inductor.list_mode_options)
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def _check_model_names(cfg: Config) -> None:
    """Names the zoo does not know are errors now, not after the dataset has been built."""
    from tricks.models import list_models
    known = list_models()
    for key, name in (("model.name", cfg.model.name), ("teacher.model", cfg.teacher.model)):
        if name is not None and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{key}={name!r}: unknown model{hint}; known: {', '.join(known)}")


def _choices() -> dict:
    """Every option with a fixed set of values, the sets taken from where they are defined."""
    from tricks.pipeline.engines.base import engine_names
    return {**_CHOICES, "data.engine": tuple(engine_names())}


def validate(cfg: Config) -> None:
    _check_model_names(cfg)
    unknown = [op for op in cfg.augment.ops if op not in AUGMENT_OPS]
    if unknown:
        raise ConfigError(f"augment.ops: unknown {', '.join(map(repr, unknown))}; choose from "
                          f"{', '.join(AUGMENT_OPS)}")
    for key, choices in _choices().items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"{key}={value!r}: choose one of {', '.join(choices)}")
    t = cfg.train
    for key, value in (("train.epochs", t.epochs), ("train.batch", t.batch),
                       ("data.image_size", cfg.data.image_size)):
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    o = cfg.optim
    for key, value, positive in (("optim.lr", o.lr, True), ("optim.final_lr", o.final_lr, True),
                                 ("optim.eps", o.eps, True), ("optim.momentum", o.momentum, False),
                                 ("optim.weight_decay", o.weight_decay, False)):
        if value < 0 or (positive and value == 0):
            raise ConfigError(f"{key} must be {'> 0' if positive else '≥ 0'}, got {value}")
    if not 0 <= t.label_smoothing < 1:
        raise ConfigError(f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}")
    if cfg.schedule.warmup_epochs < 0:
        raise ConfigError("schedule.warmup_epochs must be ≥ 0")
    if t.accumulate < 1 or t.batch % t.accumulate:
        raise ConfigError(f"train.accumulate={t.accumulate} must be ≥ 1 and divide "
                          f"train.batch={t.batch}")
    if t.compile and t.compile_mode in CUDA_GRAPH_MODES and t.accumulate > 1:
        # CUDA graphs (cudagraph trees) hand a backward replay's output to .grad, and the next
        # micro-batch's replay overwrites it: an error (pytorch/pytorch#169545, open, reproduced
        # on 2.13 nightlies) or silently wrong gradients (#96693: 1/k of the accumulated
        # gradient); torch 2.11 has no fix, so the combination is refused
        raise ConfigError(f"train.compile_mode={t.compile_mode} replays CUDA graphs, which give "
                          f"wrong gradients with train.accumulate={t.accumulate} in torch "
                          "(pytorch/pytorch#169545); use compile_mode=default or "
                          "max-autotune-no-cudagraphs, or train.accumulate=1")
    if not 0 <= t.ema_decay < 1:
        raise ConfigError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    if cfg.teacher.temperature <= 0:
        raise ConfigError(f"teacher.temperature must be > 0, got {cfg.teacher.temperature}")
    prog = cfg.data.progressive
    if prog and not (all(isinstance(p, list) and len(p) == 2 and all(isinstance(v, int) for v in p)
                         and p[0] >= 0 and p[1] >= 1 for p in prog)
                     and [p[0] for p in prog] == sorted({p[0] for p in prog})):
        raise ConfigError(f"data.progressive must be [[epoch, size], …] with increasing epochs, "
                          f"got {prog}")
    d = cfg.data
    if d.crop == "pad":
        smallest = min([d.image_size] + [p[1] for p in prog])
        if not 0 <= d.pad < smallest:
            raise ConfigError(f"data.pad={d.pad} must be in [0, {smallest}): the smallest "
                              f"training image is {smallest}²")
        if not 0 <= d.pad_fill <= 255:
            raise ConfigError(f"data.pad_fill={d.pad_fill} must be a uint8 level in 0..255")


def _preset_dir() -> Path:
    """configs/ in a source tree, or the ``tricks.configs`` package data of an installed wheel."""
    spec = importlib.util.find_spec("tricks.configs")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the presets (package tricks.configs) are missing from this install")
    return Path(list(spec.submodule_search_locations)[0])


PRESET_DIR = _preset_dir()


def preset_path(name: str) -> Path:
    """A preset's YAML file: a file path as it is (a ``.yaml``/``.yml`` name, or an existing
    file), else ``PRESET_DIR/<name>.yaml``. A folder that happens to share a preset's name (a
    ``cifar/`` dataset in the current directory) does not shadow the preset."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return path
    preset = PRESET_DIR / f"{name}.yaml"
    if not preset.is_file():
        names = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
        raise ConfigError(f"unknown preset {name!r}; presets: {names} (or give a YAML file)")
    return preset


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

