"""Table 3 and Table 5 benchmarks: tiny CPU runs that write valid JSON, Markdown and PNG."""
import json
import statistics

import pytest
from PIL import Image

from tricks.benchmarks.report import render
from tricks.train.cli import main


def test_bench_train_writes_json_markdown_png_and_ratios_follow_the_windows(
        tmp_path, capsys, shapes_records):
    assert main(["bench", "train", "--models", "resnet18", "--size", "32",
                 "--baseline-batch", "4", "--efficient-batch", "8", "--warmup", "1",
                 "--windows", "3", "--steps", "1", "--data", str(shapes_records),
                 "--workers", "0", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "train.json").read_text())
    assert doc["benchmark"] == "train" and doc["device"] and doc["versions"]["torch"]
    by = {(e["settings"]["mode"], e["settings"]["input"]): e for e in doc["results"]}
    assert set(by) == {(m, i) for m in ("baseline", "baseline-strict", "efficient")
                       for i in ("synthetic", "native")}
    for e in doc["results"]:
        assert len(e["windows"]) == 3
        assert e["median"] == statistics.median(e["windows"])
        assert e["imagenet_epoch_minutes"] == pytest.approx(1_281_167 / e["median"] / 60)
    base, eff = by[("baseline", "synthetic")], by[("efficient", "synthetic")]
    assert (base["settings"]["batch"], eff["settings"]["batch"]) == (4, 8)
    assert not base["settings"]["fused_sgd"] and eff["settings"]["fused_sgd"]
    assert base["settings"]["cudnn_benchmark"] and base["settings"]["compile"] is None
    assert base["settings"]["precision"] == "fp32" and not base["settings"]["channels_last"]
    assert eff["settings"]["precision"] == "bf16" and eff["settings"]["channels_last"]  # CPU
    ratio = eff["median"] / base["median"]
    md = (tmp_path / "train.md").read_text()
    assert f"{ratio:.2f}×" in md
    native = by[("efficient", "native")]
    frac = native["median"] / eff["median"]
    assert 0 <= native["settings"]["data_wait"] <= 1 and eff["settings"]["data_wait"] is None
    assert native["settings"]["decode"] == "workers"  # auto on a CPU
    assert f"| {100 * frac:.0f}% | {100 * native['settings']['data_wait']:.0f}% |" in md
    strict = by[("baseline-strict", "synthetic")]
    assert strict["settings"]["precision"] == "fp32" and not strict["settings"]["channels_last"]
    assert f"| {ratio:.2f}× | {eff['median'] / strict['median']:.2f}× |" in md
    # the side-by-side table printed at the end: Table 3's columns, a CPU run too
    out = capsys.readouterr().out.splitlines()
    top = out.index(next(x for x in out if x.startswith("Table 3 (He et al. 2018)")))
    head, rule, *rows = out[top + 1:top + 5]
    assert head.split("  ")[0] == "model" and [c.strip() for c in head.split("  ") if c] == [
        "model", "input", "baseline FP32 (batch 4)", "strict FP32 (no TF32)",
        "efficient BF16 (batch 8)", "efficient / baseline", "efficient / strict FP32"]
    assert set(rule.replace(" ", "")) == {"-"} and len(rule) == len(head)

    def shown(v):
        return f"{v:,.1f}" if v < 100 else f"{v:,.0f}"
    for row, inp in zip(rows, ("synthetic", "native")):
        b, st, e = (by[(m, inp)]["median"] for m in ("baseline", "baseline-strict", "efficient"))
        assert row.split() == ["resnet18", inp, shown(b), shown(st), shown(e), f"{e / b:.2f}×",
                               f"{e / st:.2f}×"]
    assert "Median images/s of 3 windows of 1 steps after 1 warm-up steps" in md
    png = Image.open(tmp_path / "train.png")
    assert png.format == "PNG" and png.size[0] > 300
    (tmp_path / "train.md").unlink()  # python -m tricks.benchmarks.report redraws from the JSON alone
    render(tmp_path / "train.json")
    assert (tmp_path / "train.md").read_text() == md


def test_bench_train_optional_modes_compile_cuda_graphs_bf16(tmp_path):
    """The optional modes run on the CPU too (reduce-overhead only adds CUDA graphs on CUDA);
    the table gives each its rate and its ratio to the baseline."""
    assert main(["bench", "train", "--models", "resnet18", "--size", "32",
                 "--baseline-batch", "4", "--efficient-batch", "8", "--warmup", "1",
                 "--windows", "2", "--steps", "1", "--compile", "--cuda-graphs", "--bf16",
                 "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "train.json").read_text())
    by = {e["settings"]["mode"]: e for e in doc["results"]}
    assert list(by) == ["baseline", "baseline-strict", "efficient", "efficient-compile",
                        "efficient-graphs", "efficient-bf16"]
    assert by["efficient-compile"]["settings"]["compile"] == "default"
    assert by["efficient-graphs"]["settings"]["compile"] == "reduce-overhead"
    assert by["efficient-bf16"]["settings"]["precision"] == "bf16"
    md = (tmp_path / "train.md").read_text()
    base = statistics.median(by["baseline"]["windows"])
    for mode in ("efficient-compile", "efficient-graphs", "efficient-bf16"):
        rate = statistics.median(by[mode]["windows"])
        shown = f"{rate:,.1f}" if rate < 100 else f"{rate:,.0f}"  # small CPU rates: 1 decimal
        assert f"{mode}: {shown} ({rate / base:.2f}×)" in md


def test_bench_train_data_windows_never_contain_an_engine_restart(tmp_path, shapes_records,
                                                                 monkeypatch):
    """6 batches an epoch (400 images at batch 64), windows of 3 steps: each window starts
    where its epoch still holds 3 batches, else after a restart and 2 untimed refill steps;
    no engine restart ever happens while a window is timed."""
    import tricks.benchmarks.throughput as tp
    timing, restarts_in_window = [False], []

    class Loader(tp.Loader):
        def __iter__(self):
            restarts_in_window.append(timing[0])
            return super().__iter__()

    class Timer(tp.Timer):
        def __enter__(self):
            timing[0] = True
            return super().__enter__()

        def __exit__(self, *exc):
            timing[0] = False
            return super().__exit__(*exc)

    monkeypatch.setattr(tp, "Loader", Loader)
    monkeypatch.setattr(tp, "Timer", Timer)
    assert main(["bench", "train", "--models", "resnet18", "--size", "16", "--modes",
                 "efficient", "--efficient-batch", "64", "--warmup", "1", "--windows", "4",
                 "--steps", "3", "--data", str(shapes_records), "--workers", "0",
                 "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "train.json").read_text())
    native = next(e for e in doc["results"] if e["settings"]["input"] == "native")
    assert native["settings"]["batches_per_epoch"] == 6
    assert native["settings"]["refill_steps"] == 2
    assert native["settings"]["window_epochs"] == [0, 1, 2, 3]
    assert len(restarts_in_window) >= 4 and not any(restarts_in_window)


def test_bench_train_too_few_batches_for_a_window_is_one_line(tmp_path, shapes_records, capsys):
    assert main(["bench", "train", "--models", "resnet18", "--efficient-batch", "64",
                 "--steps", "5", "--data", str(shapes_records), "--workers", "0",
                 "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "6 batches an epoch at batch 64" in err and not (tmp_path / "train.json").exists()


def test_bench_train_writes_its_results_after_every_configuration(tmp_path, monkeypatch):
    """A run killed (here: failing) in its third configuration leaves the two it measured."""
    import tricks.benchmarks.throughput as tp
    real, calls = tp.fit_batch, []

    class Killed(Exception):
        pass

    def third_fails(*args):
        calls.append(args[2])
        if len(calls) == 3:
            raise Killed
        return real(*args)

    monkeypatch.setattr(tp, "fit_batch", third_fails)
    with pytest.raises(Killed):
        main(["bench", "train", "--models", "resnet18", "--size", "16", "--baseline-batch",
              "2", "--efficient-batch", "2", "--warmup", "0", "--windows", "1", "--steps", "1",
              "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "train.json").read_text())
    assert [e["settings"]["mode"] for e in doc["results"]] == ["baseline", "baseline-strict"]


def test_bench_train_reuses_the_synthetic_rows_of_an_earlier_file(tmp_path, shapes_records):
    """``--synthetic-from``: the data-fed run measures only its engines and takes the synthetic
    reference rows from the earlier file (marked so), for the fractions of the table."""
    common = ["bench", "train", "--models", "resnet18", "--size", "16", "--modes", "efficient",
              "--efficient-batch", "8", "--warmup", "0", "--windows", "1", "--steps", "1"]
    assert main(common + ["--out", str(tmp_path / "syn")]) == 0
    syn = json.loads((tmp_path / "syn" / "train.json").read_text())["results"]
    assert main(common + ["--data", str(shapes_records), "--workers", "0", "--synthetic-from",
                          str(tmp_path / "syn" / "train.json"), "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "train.json").read_text())
    inputs = [e["settings"]["input"] for e in doc["results"]]
    assert inputs == ["synthetic", "native"]
    assert doc["results"][0]["windows"] == syn[0]["windows"]
    assert doc["results"][0]["settings"]["reused_from"] == str(tmp_path / "syn" / "train.json")
    assert "| resnet18 | efficient | native |" in (tmp_path / "train.md").read_text()


def test_bench_train_compile_without_a_compiler_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    for var in ("CC", "CXX"):
        monkeypatch.delenv(var, raising=False)
    assert main(["bench", "train", "--models", "resnet18", "--compile",
                 "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: efficient-compile: torch.compile on cpu") and "\n" not in err


def test_bench_train_unknown_model_lists_the_known_ones(tmp_path, capsys):
    assert main(["bench", "train", "--models", "resnet51", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "unknown model(s) resnet51; known:" in err and "resnet50d" in err
    assert "inception_v3" in err


def test_bench_train_bad_engine_fails_before_any_timing(tmp_path, capsys, shapes_records):
    assert main(["bench", "train", "--models", "resnet18", "--data", str(shapes_records),
                 "--engines", "native,fcv", "--out", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert err.strip() == "error: unknown engine 'fcv'; available: dali, ffcv, native"
    assert "images/s" not in out and not (tmp_path / "train.json").exists()


def test_bench_models_table5(tmp_path):
    assert main(["bench", "models", "--models", "resnet50,resnet50d,resnet18d",
                 "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "models.json").read_text())
    rows = {r["model"]: r for r in doc["rows"]}
    assert rows["resnet50"]["paper_gmacs"] == 3.8 and abs(rows["resnet50"]["diff_pct"]) < 3
    assert rows["resnet18d"]["paper_gmacs"] is None
    assert 25 < rows["resnet50d"]["params_m"] < 26
    md = (tmp_path / "models.md").read_text()
    assert "| resnet50d | 25.58 | 4.33 | 4.3 | +0.7% |" in md


@pytest.mark.parametrize("name", ["train", "models", "loader", "augment"])
def test_bench_help_names_the_command_typed(name, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", name, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: tricks bench {name} ")


def test_default_results_go_under_the_cwd_never_into_the_checkout(tmp_path, monkeypatch):
    # an editable install's package folder is the checkout: a trial `tricks bench` there must
    # not overwrite the committed benchmarks/results/
    from tricks.benchmarks.results import default_results_dir
    monkeypatch.chdir(tmp_path)
    assert default_results_dir() == tmp_path / "benchmarks-results"
