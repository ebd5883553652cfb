"""The ``tricks`` command: train, eval, convert, verify, show-batch, plot, bench, ablate."""
from __future__ import annotations

import argparse
import json
import sys

from tricks.errors import UserError, exit_on_user_error



def get_parser() -> argparse.ArgumentParser:
    """The parser, unparsed, so other launchers can extend it."""
    p = argparse.ArgumentParser(prog="tricks", description="Bag-of-tricks image classifier "
                                "training with a fast data pipeline.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (no options: the embedded demo)")
    t.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. train.epochs=3 data.path=/data/imagenet")
    t.add_argument("-c", "--config", action="append", default=None, metavar="YAML",
                   help="config preset(s), applied in order (a name from configs/ or a path); "
                        "default: demo")
    t.add_argument("--resume", metavar="CHECKPOINT_OR_RUN_DIR",
                   help="continue a run at the exact iteration it stopped")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML and exit (nothing is built)")

    s = sub.add_parser("show-batch", help="a PNG grid of one augmented, mixed training batch")
    s.add_argument("overrides", nargs="*", metavar="section.key=value")
    s.add_argument("-c", "--config", action="append", default=None, metavar="YAML")
    s.add_argument("--out", default="batch.png", help="PNG to write (default: batch.png)")
    s.add_argument("--count", type=int, default=16, help="samples to show")
    s.add_argument("--epoch", type=int, default=0, help="which epoch's draw to show")

    pl = sub.add_parser("plot", help="overlay runs' loss, top-1 and LR against epochs in a PNG")
    pl.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    pl.add_argument("--out", default="curves.png", help="PNG to write (default: curves.png)")

    lr = sub.add_parser("lr", help="the LR of every update, for every schedule × warmup "
                        "combination: a listing and a PNG, before training")
    lr.add_argument("overrides", nargs="*", metavar="section.key=value")
    lr.add_argument("-c", "--config", action="append", default=None, metavar="YAML")
    lr.add_argument("--steps-per-epoch", type=int, default=None,
                    help="updates per epoch (default: the train split of data.path ÷ train.batch)")
    lr.add_argument("--png", default="lr.png", help="PNG to write (default: lr.png)")
    lr.add_argument("--every", type=int, default=None,
                    help="list every N-th update (default: all of a run of ≤ 1000 updates, "
                         "else the first and last of each epoch)")

    b = sub.add_parser("bench", help="benchmarks: train (Table 3), models (Table 5), loader, "
                       "augment, scale (convert, start-up, plan at ImageNet size); "
                       "`tricks bench NAME --help` for each")
    b.add_argument("name", choices=["train", "models", "loader", "augment", "scale"])
    b.add_argument("args", nargs=argparse.REMAINDER)

    # `tricks ablate …` is handed whole to benchmarks.ablate's own parser (see main)
    sub.add_parser("ablate", help="the paper's ablation tables (4, 5, 6, augment) on a dataset; "
                   "`tricks ablate --help`", add_help=False)

    e = sub.add_parser("eval", help="evaluate a checkpoint on a dataset's validation split")
    e.add_argument("checkpoint")
    e.add_argument("data", help="converted folder or ImageFolder tree")
    e.add_argument("--split", default=None, help="split to evaluate (default: val/validation/test)")
    e.add_argument("--batch", type=int, default=None)
    e.add_argument("--device", default="auto")
    e.add_argument("--workers", type=int, default=None)
    e.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None,
                   help="default: the checkpoint's train.precision (fp16 needs CUDA)")

    c = sub.add_parser("convert", help="ImageFolder tree → packed record files")
    c.add_argument("src", help="class folders, or train/ val/ (test/) each with class folders")
    c.add_argument("dst")
    c.add_argument("--max-side", type=int, default=None,
                   help="re-encode images whose longer side exceeds this")
    c.add_argument("--quality", type=int, default=90, help="JPEG quality when re-encoding")
    c.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    c.add_argument("--strict", action="store_true", help="fail on the first unusable file")
    c.add_argument("--keep-empty-classes", action="store_true",
                   help="keep classes that have no training image (refused by default)")
    c.add_argument("--format", choices=["records", "beton"], default="records",
                   help="beton: also write FFCV .beton files (from the validated records)")
    c.add_argument("--beton-mode", default="jpg", choices=["jpg", "raw", "proportion", "smart"],
                   help="FFCV RGBImageField write_mode")
    c.add_argument("--beton-max-resolution", type=int, default=None,
                   help="FFCV max_resolution (longer side) of stored images")
    c.add_argument("--val-labels", default=None, metavar="FILE",
                   help="labels for a flat validation folder ('file class' lines or ImageNet's "
                        "LOC_val_solution.csv)")
    c.add_argument("--resize-filter", choices=["area", "lanczos"], default="area",
                   help="--max-side's filter: area (DCT scaling + box average, as FFCV's "
                        "INTER_AREA; fast) or lanczos (full decode; sharper)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")

    v = sub.add_parser("verify", help="check every record of a converted dataset against its "
                       "checksum (exit status 1 when any is bad)")
    v.add_argument("path", help="converted folder or one .rec file")
    v.add_argument("--decode", action="store_true",
                   help="also decode every record (slower: finds records written damaged)")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def cmd_train(args) -> int:
    from .checkpoint import load_checkpoint
    from .config import load_config, preset_path
    from .trainer import Trainer

    if args.resume:
        if args.config:
            raise UserError("--resume takes the run's saved config; give overrides, not --config")
        cfg = load_config([], args.overrides, base=load_checkpoint(args.resume)["config"])
    else:
        cfg = load_config([preset_path(c) for c in (args.config or ["demo"])], args.overrides)
    if args.print_config:
        from .config import dump_config
        print(dump_config(cfg), end="")
        return 0
    from . import distributed
    from .trainer import Stopped

    trainer = None
    try:
        trainer = Trainer(cfg, resume=args.resume, progress=not args.no_progress)
        say = trainer.log
        say(f"run dir: {trainer.run_dir}  (device {trainer.device}, {cfg.model.name}, "
            f"{_count(trainer.num_classes, 'class', 'classes')}, "
            f"{_count(trainer.steps_per_epoch, 'iteration')}/epoch, "
            f"{_count(trainer.dist.world_size, 'process', 'processes')})")
        try:
            result = trainer.fit()
        except Stopped as e:
            say(str(e))
            return 128 + e.signum
        say(f"run dir:    {trainer.run_dir}")
        say(f"checkpoint: {trainer.checkpoint_path}")
        say(f"metrics:    {trainer.metrics_path}")
        if result.get("val_top1") is not None:
            say(f"final val top-1 {100 * result['val_top1']:.2f}%, "
                f"top-5 {100 * result['val_top5']:.2f}%")
        return 0
    finally:
        if trainer is not None:
            trainer.close()
        distributed.shutdown()


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def cmd_show_batch(args) -> int:
    import torch

    from tricks.pipeline.preview import save_grid

    from .config import load_config, preset_path
    from tricks.pipeline.source import resolve_dataset

    from .data import make_loaders

    cfg = load_config([preset_path(c) for c in (args.config or ["demo"])], args.overrides)
    cfg.train.batch = args.count
    root = resolve_dataset(cfg.data.path, cfg.data.max_side, cfg.data.quality)
    train, val = make_loaders(cfg, root, torch.device("cpu"), torch.float32)
    train.set_epoch(args.epoch)
    images, targets = next(iter(train))
    path = save_grid(images, targets, train.classes, args.out)
    train.close()
    if val is not None:
        val.close()
    ops = ", ".join(cfg.augment.ops) or "none"
    print(f"wrote {path}: {len(images)} samples of epoch {args.epoch} "
          f"(augment: {ops}; mix: {cfg.mix.name})")
    return 0


def cmd_plot(args) -> int:
    from .plot import plot_runs
    print(f"wrote {plot_runs(args.runs, args.out)}")
    return 0


def cmd_lr(args) -> int:
    from .config import load_config, preset_path
    from .lr_listing import format_listing, lr_columns, plot_png

    cfg = load_config([preset_path(c) for c in (args.config or ["demo"])], args.overrides)
    spe = args.steps_per_epoch
    if spe is None:
        from tricks.pipeline.records import RecordFile, split_path
        from tricks.pipeline.sampling import num_batches

        from tricks.pipeline.source import resolve_dataset
        root = resolve_dataset(cfg.data.path, cfg.data.max_side, cfg.data.quality)
        path = split_path(root, cfg.data.train_split)
        if not path.is_file():
            raise UserError(f"{root} has no split {cfg.data.train_split!r}")
        spe = num_batches(len(RecordFile(path)), cfg.train.batch, drop_last=True)
    if spe < 1:
        raise UserError(f"--steps-per-epoch must be at least 1, got {spe} (a dataset smaller "
                        f"than train.batch={cfg.train.batch}?)")
    columns = lr_columns(cfg, spe)
    print(format_listing(columns, spe, args.every))
    png = plot_png(columns, spe, args.png, f"{cfg.model.name}, batch {cfg.train.batch}, "
                   f"{cfg.train.epochs} epochs × {spe} updates")
    print(f"wrote {png}")
    return 0


def cmd_bench(args) -> int:
    import importlib
    module = {"train": "throughput", "models": "model_table", "loader": "loader",
              "augment": "augment", "scale": "scale"}[args.name]
    return importlib.import_module(f"tricks.benchmarks.{module}").main(args.args)


def cmd_ablate(args) -> int:
    from tricks.benchmarks.ablate import main as ablate_main
    return ablate_main(args.args)


def cmd_eval(args) -> int:
    from .checkpoint import load_checkpoint
    from tricks.pipeline.source import resolve_dataset

    from .build import build_model, place_model, resolve_precision, select_device
    from .config import load_config
    from .data import make_val_loader, pick_val_split
    from .loss import SoftTargetCrossEntropy
    from .progress import progress_enabled
    from .trainer import evaluate
    state = load_checkpoint(args.checkpoint)
    cfg = load_config(base=state["config"])
    device = select_device(args.device)
    fix = "evaluate with --precision fp32 (or bf16) on the CPU"
    precision = resolve_precision(args.precision, device, "--precision", fix) if args.precision \
        else resolve_precision(cfg.train.precision, device, "the checkpoint's train.precision",
                               fix)
    root = resolve_dataset(args.data, cfg.data.max_side, cfg.data.quality)
    split = pick_val_split(root, args.split)
    if split is None:
        raise UserError(f"{root} has no validation split; name one with --split")
    loader = make_val_loader(cfg, root, split, device, precision.dtype, batch=args.batch,
                             workers=args.workers)
    if loader.classes != state.get("classes", loader.classes):
        raise UserError(f"{root}: its class list differs from the checkpoint's")
    cfg.model.weights = None
    model = build_model(cfg, loader.num_classes)
    model.load_state_dict(state["model"])
    model = place_model(model, device, cfg.train.channels_last)
    autocast = precision.autocast()
    result = evaluate(model, loader, SoftTargetCrossEntropy(loader.num_classes), autocast,
                      progress=progress_enabled(True))
    loader.close()
    # the same words and units as `tricks train`'s epoch line; then the record, as fractions
    print(f"{split}: top-1 {100 * result['val_top1']:.2f}%, top-5 {100 * result['val_top5']:.2f}%"
          f", loss {result['val_loss']:.4f} ({result['val_images']} images)")
    print(json.dumps({"checkpoint": state["path"], "data": str(root), "split": split, **result}))
    return 0


def cmd_convert(args) -> int:
    from tricks.pipeline.convert import convert, format_report
    beton = None
    if args.format == "beton":
        beton = dict(write_mode=args.beton_mode, max_resolution=args.beton_max_resolution,
                     jpeg_quality=args.quality)
    report = convert(args.src, args.dst, max_side=args.max_side, quality=args.quality,
                     workers=args.workers, strict=args.strict, val_labels=args.val_labels,
                     beton=beton, keep_empty_classes=args.keep_empty_classes,
                     resize=args.resize_filter, progress=not args.no_progress,
                     log=lambda m: print(m, file=sys.stderr))
    print(format_report(report))
    return 0


def cmd_verify(args) -> int:
    from tricks.pipeline.verify import verify
    total, problems = verify(args.path, progress=not args.no_progress, decode=args.decode)
    for p in problems[:100]:
        print(f"bad: {p}")
    if len(problems) > 100:
        print(f"… and {len(problems) - 100} more")
    print(f"{args.path}: {total} records checked, {len(problems)} bad")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ablate"]:
        args = argparse.Namespace(command="ablate", args=argv[1:])
    else:
        parser = get_parser()
        args, extra = parser.parse_known_args(argv)
        # key=value overrides may come after an option too (argparse's nargs="*" list stops at
        # the first option), as timm's and Hydra's overrides go anywhere on the line
        if extra and isinstance(getattr(args, "overrides", None), list) and \
                all("=" in x and not x.startswith("-") for x in extra):
            args.overrides += extra
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    handler = {"train": cmd_train, "eval": cmd_eval, "convert": cmd_convert, "verify": cmd_verify,
               "show-batch": cmd_show_batch, "plot": cmd_plot, "bench": cmd_bench,
               "lr": cmd_lr, "ablate": cmd_ablate}[args.command]
    return exit_on_user_error(lambda: handler(args))


if __name__ == "__main__":
    sys.exit(main())
