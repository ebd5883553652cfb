
import pytest

from tricks.train.config import PRESET_DIR as CONFIG_DIR
from tricks.errors import ConfigError
from tricks.train.config import load_config

CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_preset_loads(path):
    load_config([path])


def test_presets_say_what_the_paper_says():
    base = load_config([CONFIG_DIR / "baseline.yaml"])
    assert (base.train.batch, base.train.precision, base.train.epochs) == (256, "fp32", 120)
    assert (base.optim.lr, base.optim.nesterov, base.optim.weight_decay) == (0.1, True, 1e-4)
    assert base.schedule.name == "step" and base.schedule.step_epochs == [30, 60, 90]
    assert base.model.init == "xavier"
    eff = load_config([CONFIG_DIR / "baseline.yaml", CONFIG_DIR / "efficient.yaml"])
    assert (eff.train.batch, eff.train.precision, eff.train.channels_last) == (1024, "fp16", True)
    assert eff.schedule.warmup_epochs == 5 and eff.model.zero_init_last
    assert eff.optim.no_bias_decay and eff.optim.lr_scaling == "linear"


def test_overrides_apply_after_files_with_yaml_values():
    cfg = load_config([CONFIG_DIR / "baseline.yaml"],
                      ["train.epochs=3", "optim.lr=0.2", "data.scale=[0.2, 1]",
                       "train.channels_last=true", "data.path=/x"])
    assert (cfg.train.epochs, cfg.optim.lr, cfg.data.scale) == (3, 0.2, [0.2, 1])
    assert cfg.train.channels_last is True and cfg.data.path == "/x"


@pytest.mark.parametrize("override,message", [
    ("train.epoch=3", "unknown config key 'train.epoch' (did you mean train.epochs?)"),
    ("nope=1", "unknown config key 'nope'"),
    ("train.epochs=three", "train.epochs must be a number"),
    ("train.epochs=2.5", "must be an integer"),
    ("train.channels_last=1", "must be true or false"),
    ("train.precision=fp8", "choose one of fp32, fp16, bf16"),
    ("train.compile_mode=fast", "train.compile_mode='fast': choose one of default, "
                                "reduce-overhead"),
    ("train.batch=0", "train.batch must be at least 1"),
    ("epochs", "not of the form"),
    # a misspelt model is a config error, before any dataset is built
    ("model.name=resnet50dd", "model.name='resnet50dd': unknown model (did you mean resnet50d?)"),
    ("teacher.model=resnt152d", "teacher.model='resnt152d': unknown model"),
])
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config([], [override])
    assert message in str(e.value)


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key 'train\.lr'"):
        load_config([bad])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config([tmp_path / "missing.yaml"])



def test_refined_preset_says_what_section_5_says():
    cfg = load_config([CONFIG_DIR / f"{n}.yaml" for n in ("baseline", "efficient", "refined")])
    assert cfg.schedule.name == "cosine" and cfg.schedule.warmup_epochs == 5
    assert cfg.train.label_smoothing == 0.1 and cfg.train.epochs == 200
    assert (cfg.mix.name, cfg.mix.alpha) == ("mixup", 0.2)
    assert (cfg.teacher.checkpoint, cfg.teacher.temperature) == (None, 20.0)
    assert (cfg.model.name, cfg.train.batch, cfg.train.precision) == ("resnet50d", 1024, "fp16")


@pytest.mark.parametrize("override,message", [
    ("data.engine=nvjpeg", "data.engine='nvjpeg': choose one of dali, ffcv, native"),
    ("augment.ops=[jitter, sharpen]", "augment.ops: unknown 'sharpen'; choose from jitter"),
    ("mix.name=mixop", "mix.name='mixop': choose one of none, mixup, cutmix, ricap"),
])
def test_choices_come_from_the_registries_and_are_checked_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], [override])


def test_crop_defaults_are_the_loaders():
    from tricks.pipeline.options import DEFAULT_CROP_RATIO, DEFAULT_RATIO, DEFAULT_SCALE
    d = load_config().data
    assert (tuple(d.scale), tuple(d.ratio), d.crop_ratio) == (DEFAULT_SCALE, DEFAULT_RATIO,
                                                              DEFAULT_CROP_RATIO)
