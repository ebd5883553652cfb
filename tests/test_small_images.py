"""The small-image benchmark's ablation variants (``--variant NAME:KEY=V,…``)."""
import pytest

from tricks.benchmarks.small_images import _variant


def test_variant_is_a_name_and_its_overrides():
    assert _variant("bare:train.label_smoothing=0,data.pad=0") == (
        "bare", ["train.label_smoothing=0", "data.pad=0"])


@pytest.mark.parametrize("text", ["bare", ":data.pad=0", "plain:data.pad=0", "preset:x=1",
                                  "bare:data.pad"])
def test_bad_variant_is_refused_naming_it(text, capsys):
    with pytest.raises(SystemExit, match="--variant"):
        _variant(text)
