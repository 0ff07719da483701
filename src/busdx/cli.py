"""Command-line interface: ``busdx train | evaluate | predict | export | serve | cv | ...``.

Only wiring lives here: parse arguments, call the library, print results, choose exit codes.
Any :class:`BusdxError` becomes a one-line message and exit code 2; set ``BUSDX_DEBUG=1`` to see
its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from busdx import __version__
from busdx.audit import DEFAULT_MAX_DISTANCE, audit_dataset, write_audit
from busdx.boxes import parse_box, read_boxes_csv
from busdx.bundled import DEFAULT_MODEL, bundled_info, list_bundled, resolve_run
from busdx.config import Config, apply_overrides, list_recipes, load_config
from busdx.data import apply_split_file, resolve_workers, scan_dataset
from busdx.devices import PRECISIONS, resolve_device
from busdx.dicom import ANY_MODALITY_ENV
from busdx.distributed import broadcast, init_world
from busdx.errors import BusdxError, ConfigError, DataError, ExportError, RunDirError
from busdx.evaluation import (
    calibrate_model,
    compare_evaluations,
    evaluate_samples,
    format_comparison,
    format_metrics,
)
from busdx.explain import explain_image
from busdx.export import EXPORT_REPORT, export_run
from busdx.fileio import atomic_path, atomic_write_text
from busdx.imaging import ImageInput
from busdx.inference import (
    Prediction,
    image_inputs,
    iter_image_paths,
    parse_frame,
    parse_shard,
    predict_files,
    take_shard,
    write_predictions,
)
from busdx.model_card import write_report
from busdx.pipeline import cross_validate, format_cv, train_and_evaluate
from busdx.predictor import BACKENDS, Predictor, load_model
from busdx.readers import match_reader_scores, rank_categories, read_reader_scores
from busdx.runs import (
    CONFIG_FILE,
    INFO_FILE,
    SPLIT_FILE,
    create_run_dir,
    load_run,
    prepare_dataset,
    resumed_config,
    run_sources,
    samples_for_split,
    save_config,
    save_run,
)
from busdx.synthetic import write_synthetic_dataset
from busdx.training import MODEL_FILE, fit
from busdx.transforms import load_region
from busdx.weights import get_weight_spec, resolve_weights_file

logger = logging.getLogger("busdx")

EXAMPLES = """examples:
  busdx predict scan.png                       (the bundled model: no training needed)
  busdx models
  busdx demo
  busdx train --data BUSI/ --out runs/vgg16 --epochs 30
  busdx train --resume runs/vgg16
  busdx evaluate --run runs/vgg16 --data BUSI/ --split test
  busdx evaluate --run runs/vgg16 --data BrEaST/ --split all --site breast
  busdx compare runs/vgg16/eval/breast-all runs/lite0/eval/breast-all
  busdx predict --run runs/vgg16 scans/ extra.png --out predictions.csv
  busdx export --run runs/vgg16 --int8
  busdx predict --run runs/vgg16 --backend onnx scans/ --out predictions.csv
  busdx predict --run runs/vgg16 scan.png --explain overlays/
  busdx serve --run runs/vgg16
"""


def _overrides(args: argparse.Namespace) -> list[str]:
    shortcuts = {
        "epochs": "train.epochs",
        "batch_size": "train.batch_size",
        "lr": "train.lr",
        "seed": "train.seed",
        "device": "train.device",
        "weights": "model.weights",
        "split_file": "data.split_file",
        "image_size": "data.image_size",
    }
    items = [
        f"{key}={getattr(args, name)}"
        for name, key in shortcuts.items()
        if getattr(args, name, None) is not None
    ]
    return items + list(args.set or [])


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume:
        run_dir = Path(args.resume)
        config, info = load_run(run_dir)
        config = resumed_config(run_dir, config, _overrides(args))
        config.data.split_file = str(run_dir / SPLIT_FILE)
    elif not args.data:
        raise DataError("--data DIR is required (or --resume RUNDIR to continue a run)")
    else:
        config = apply_overrides(load_config(args.config, recipe=args.recipe), _overrides(args))
    world = init_world(resolve_device(config.train.device))  # several processes: torchrun
    dataset = prepare_dataset(config, args.data or run_sources(info))
    if args.resume and world.is_main:
        save_config(run_dir, config)  # overrides such as more epochs are recorded
    elif not args.resume:
        run_dir = create_run_dir(args.out, config.recipe) if world.is_main else None
        if world.is_main:
            save_run(run_dir, config, dataset)
        run_dir = broadcast(run_dir)
    if not world.is_main:  # a helper process: its share of the training, then done
        fit(config, dataset, run_dir, progress=False)
        return 0
    result = train_and_evaluate(config, dataset, run_dir, progress=not args.no_progress)
    print(format_metrics(result))
    print(f"run directory: {run_dir}")
    if args.export:
        try:
            _print_export(run_dir, export_run(run_dir, int8=True))
        except ExportError as exc:  # the int8 guard: the fp32 export stands
            print(f"int8 not kept: {exc}")
    return 0


def _reader_ranks(args: argparse.Namespace, dataset_root: Path, samples: list):
    """Readers' BI-RADS ranks of the images: from --readers, else the labels table the images
    came from, else DATA/labels.csv if it has them."""
    from_table = rank_categories([s.birads for s in samples])
    if from_table is not None and not args.readers:
        return from_table
    relpaths = [s.relpath for s in samples]
    path = Path(args.readers) if args.readers else dataset_root / "labels.csv"
    if not path.is_file():
        if args.readers:
            raise DataError(f"reader scores file {path} does not exist")
        return None
    try:
        scores = read_reader_scores(path, column=args.reader_column)
    except DataError:
        if args.readers:
            raise
        return None  # a labels.csv without reader scores
    ranks = match_reader_scores(relpaths, scores)
    if ranks is None:
        logger.warning("%s lacks reader scores for some images: no reader comparison", path)
    return ranks


def cmd_evaluate(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    config, info = load_run(run_dir)
    if args.boxes:
        if config.data.region != "box":
            raise ConfigError("--boxes is for a model trained on lesion boxes (data.region: box)")
        config.data.boxes = args.boxes
    dataset = samples_for_split(run_dir, config, info, args.data, args.split)
    site = args.site or dataset.site
    variant = (
        "-onnx"
        if args.backend == "onnx"
        else ""
        if args.precision == "fp32"
        else (f"-{args.precision}")
    )
    name = f"{site}-{args.split}{variant}"
    out = Path(args.out) if args.out else run_dir / "eval" / name
    loaded = load_model(run_dir, device=args.device, backend=args.backend,
                        precision=args.precision)  # fmt: skip
    result = evaluate_samples(
        loaded,
        dataset.samples,
        out,
        split=args.split,
        data_root=dataset.root,
        settings=config.evaluate,
        site=site,
        reader_ranks=_reader_ranks(args, dataset.root, dataset.samples),
        progress=not args.no_progress,
    )
    print(format_metrics(result))
    print(f"written to {out}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    config, info = load_run(run_dir)
    dataset = samples_for_split(run_dir, config, info, args.data, args.split)
    site = args.site or dataset.site
    out = Path(args.out) if args.out else run_dir.with_name(f"{run_dir.name}-{site}")
    create_run_dir(out, config.recipe)  # refuses an existing run directory
    config = apply_overrides(config, list(args.set or []))
    for name in (CONFIG_FILE, SPLIT_FILE, MODEL_FILE):
        shutil.copyfile(run_dir / name, out / name)
    save_config(out, config)
    info["calibrated"] = {"from_run": str(run_dir.resolve()), "data": str(dataset.root),
                          "site": site, "split": args.split, "n": len(dataset.samples),
                          "head_refitted": args.refit_head}  # fmt: skip
    atomic_write_text(out / INFO_FILE, json.dumps(info, indent=2) + "\n")
    loaded = load_model(out, device=args.device)
    fitted = calibrate_model(out, loaded, dataset.samples, config.evaluate,
                             source=f"site {site}: {len(dataset.samples)} labelled cases",
                             refit=args.refit_head, progress=not args.no_progress)  # fmt: skip
    cases = fitted["calibration_cases"]
    if args.refit_head:
        refit = fitted["head_refit"]
        print(
            "head: kept as trained (refitting did not help out of fold)"
            if refit["kept_trained_head"]
            else f"head: last layer refitted (anchor strength {refit['strength']:g}, chosen by "
            f"{refit['folds']}-fold cross-validation over the cases)"
        )
    print(
        f"calibrated on {cases['n']} cases of {site} ({cases['n_positive']} positive): "
        f"temperature {fitted['temperature']:.3f}, threshold {fitted['threshold']:.3f} "
        f"({fitted['threshold_policy']}); ECE {fitted['validation_ece']['uncalibrated']:.3f} -> "
        f"{fitted['validation_ece']['calibrated']:.3f}\nnew run: {out} (the original is unchanged)"
    )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    settings = load_config().evaluate
    settings.n_bootstrap = args.n_bootstrap
    result = compare_evaluations(Path(args.a), Path(args.b), settings,
                                 out=Path(args.out) if args.out else None)  # fmt: skip
    print(format_comparison(result))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    args.run = str(resolve_run(args.run))
    if args.ray:
        return _predict_on_ray(args)
    shard = parse_shard(args.shard)
    loaded = load_model(args.run, device=args.device, backend=args.backend, threads=args.threads,
                        precision=args.precision)  # fmt: skip
    choice = _input_choice(args, loaded.preprocessing.region == "box")

    def inputs() -> Iterator[ImageInput]:
        return image_inputs(take_shard(iter_image_paths(args.paths), shard), **choice)

    total = sum(1 for _ in inputs())
    if not total:
        raise DataError(f"no image files found in {', '.join(args.paths)}")
    if args.box and total > 1:
        raise ConfigError(f"--box is one image's lesion box, but {total} images were given; "
                          "use --boxes FILE (path,x,y,w,h) for several")  # fmt: skip
    started = time.perf_counter()
    rows = predict_files(
        loaded,
        inputs(),
        total=total,
        batch_size=args.batch_size,
        threshold=args.threshold,
        workers=resolve_workers(args.workers),
        progress=not args.no_progress,
    )
    if args.explain:
        explainer = loaded if loaded.model is not None else load_model(args.run, device=args.device)
        rows = _with_explanations(rows, explainer, args.explain)
    count, failed = write_predictions(rows, args.out)
    seconds = time.perf_counter() - started
    logger.info(
        "%d image(s) predicted, %d failed, in %.1f s (%.1f img/s, %s backend, %s)%s",
        count - failed,
        failed,
        seconds,
        count / seconds,
        loaded.backend,
        loaded.path.name,
        f"; written to {args.out}" if args.out else "",
    )
    return 0


def _input_choice(args: argparse.Namespace, roi_model: bool) -> dict[str, Any]:
    """``--frame``, ``--box`` and ``--boxes`` as :func:`image_inputs` arguments, refused
    when they do not fit the model (an ROI model needs boxes; a whole-image one takes none)."""
    if args.box and args.boxes:
        raise ConfigError("give --box (one image) or --boxes FILE (several), not both")
    given = bool(args.box or args.boxes)
    if roi_model and not given:
        raise ConfigError("this model classifies a lesion box (ROI mode): give --box x,y,w,h "
                          "for one image or --boxes FILE (path,x,y,w,h) for several")  # fmt: skip
    if given and not roi_model:
        raise ConfigError("this model was trained on whole images; it takes no --box or "
                          "--boxes (train one with --set data.region=box)")  # fmt: skip
    return {
        "frame": parse_frame(args.frame),
        "box": parse_box(args.box) if args.box else None,
        "boxes": read_boxes_csv(args.boxes) if args.boxes else None,
    }


def _predict_on_ray(args: argparse.Namespace) -> int:
    if not args.out:
        raise ConfigError("--ray needs --out FILE.csv or FILE.parquet (results are merged there)")
    if args.shard or args.explain or args.precision != "fp32" or args.box or args.boxes:
        raise ConfigError("--ray runs the exported ONNX model over all images: it does not take "
                          "--shard, --explain, --precision, --box or --boxes")  # fmt: skip
    from busdx.cluster import predict_on_ray

    summary = predict_on_ray(
        args.run,
        args.paths,
        args.out,
        address=args.ray_address,
        workers=args.ray_workers,
        batch_size=args.batch_size,
        threshold=args.threshold,
        progress=not args.no_progress,
    )
    logger.info(
        "%d image(s) predicted now (%d done before), %d failed in all, in %.1f s; written to %s",
        summary.predicted, summary.skipped, summary.failed, summary.seconds, args.out,
    )  # fmt: skip
    return 0


def _with_explanations(
    rows: Iterable[Prediction], loaded: Predictor, out: str
) -> Iterator[Prediction]:
    """Pass rows through, writing a Grad-CAM overlay for each readable image into ``out``."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for index, row in enumerate(rows):
        if row.error is None:
            item = ImageInput(Path(row.path), row.frame or 0, row.box)
            explanation = explain_image(loaded, load_region(item, loaded.preprocessing))
            target = folder / f"{index:05d}-{Path(row.path).stem}-gradcam.png"
            with atomic_path(target) as tmp:
                explanation.overlay.save(tmp, format="PNG")
        yield row


def cmd_serve(args: argparse.Namespace) -> int:
    from busdx.serving import ServeSettings, serve  # FastAPI: only the server needs it

    args.run = str(resolve_run(args.run))
    settings = ServeSettings.from_options(
        max_upload_mb=args.max_upload_mb,
        max_pixels=args.max_pixels,
        max_files=args.max_files,
        workers=args.workers,
        queue_size=args.queue_size,
        api_key=args.api_key,
        cors_origins=tuple(args.cors_origin) if args.cors_origin else None,
        backend=args.backend,
    )
    serve(args.run, host=args.host, port=args.port, settings=settings,
          allow_no_key=args.no_api_key)  # fmt: skip
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    report = export_run(
        args.run,
        int8=args.int8,
        calibration_dir=args.calibration,
        calibration_size=args.calibration_size,
        data_root=args.data,
        max_auc_drop=args.max_auc_drop,
        force=args.allow_auc_drop,
        weight_bits=args.int8_weight_bits,
    )
    _print_export(Path(args.run), report)
    return 0


def _print_export(run_dir: Path, report: dict[str, Any]) -> None:
    check = report["onnx"]["vs_torch"]
    print(
        f"{run_dir / report['onnx']['file']}: fp32 ONNX; on {check['n']} validation images "
        f"max |logit - torch| {check['max_abs_logit_difference']:.2e}, "
        f"decision agreement {check['agreement']:.3f}"
    )
    if "int8" in report:
        check = report["int8"]["vs_fp32"]
        aucs = (check["roc_auc_reference"], check["roc_auc_candidate"], check["roc_auc_drop"])
        auc_text = "ROC AUC fp32 {:.3f} -> int8 {:.3f} (drop {:+.3f})".format(*aucs)
        print(
            f"{run_dir / report['int8']['file']}: int8 (calibrated on "
            f"{report['int8']['calibration']['images']} images); decision agreement with fp32 "
            f"{check['agreement']:.3f}; " + (auc_text if aucs[0] is not None else "no AUC")
        )
    print(f"report: {run_dir / EXPORT_REPORT}; busdx predict and serve use the "
          f"{'int8' if 'int8' in report else 'torch'} model by default")  # fmt: skip


def _resumed_cv_config(out: Path, args: argparse.Namespace) -> Config:
    """The saved config of a CV folder with the command's ``evaluate.*`` settings applied.

    They change only what is computed from the fold predictions (the summary's cross-fitted
    check and the ensemble's calibration); a different training setting would mix two
    experiments in one folder and is refused.
    """
    saved = load_config(out / CONFIG_FILE)
    config = apply_overrides(saved, _overrides(args))
    training = {k: v for k, v in config.to_dict().items() if k != "evaluate"}
    if training != {k: v for k, v in saved.to_dict().items() if k != "evaluate"} or (
        args.recipe and args.recipe != saved.recipe
    ):
        raise ConfigError(
            f"{out} holds a cross-validation trained with other settings; only evaluate.* "
            "settings can change when resuming it: choose a new --out to train differently"
        )
    return config


def cmd_cv(args: argparse.Namespace) -> int:
    config = apply_overrides(load_config(args.config, recipe=args.recipe), _overrides(args))
    out = Path(args.out) if args.out else Path("runs") / f"cv-{config.recipe}"
    if out.exists() and not (out / "folds.csv").is_file() and any(out.iterdir()):
        raise RunDirError(
            f"{out} exists and is not a cross-validation folder; choose another --out"
        )
    if (out / CONFIG_FILE).is_file():  # resuming: only evaluate.* settings may change
        config = _resumed_cv_config(out, args)
    dataset = prepare_dataset(config, args.data, progress=not args.no_progress)
    out.mkdir(parents=True, exist_ok=True)
    save_config(out, config)
    summary = cross_validate(
        config,
        dataset,
        out,
        n_folds=args.folds,
        group_by=args.group_by,
        progress=not args.no_progress,
    )
    print(format_cv(summary))
    print(f"written to {out} (cv_metrics.json, cv_roc_curve.png, fold-*/)")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    names = list_bundled()
    if not names:
        print("no bundled models in this installation of busdx")
        return 1
    for name in names:
        info = bundled_info(name)
        default = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name}{default}: {info['description']}")
        sites = ", ".join(info["trained_on"])
        print(f"  trained on: {sites}; {info['size_mb']} MB at {info['path']}")
        for site, row in info.get("held_out_sites", {}).items():
            print(f"  expected at an unseen hospital, as measured when {site} was held out: "
                  f"ROC AUC {row['roc_auc']:.3f}; sensitivity {row['sensitivity']:.3f}, "
                  f"specificity {row['specificity']:.3f} at its threshold")  # fmt: skip
    print("use one with: busdx predict [--run NAME] scan.png; busdx serve [--run NAME]")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    report, card = write_report(args.run)
    print(f"report: {report}\nmodel card: {card}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    config = load_config()
    dataset = scan_dataset(args.data, config.data.classes, include_normal=not args.exclude_normal)
    if args.split_file:
        dataset = apply_split_file(dataset, args.split_file)
    result = audit_dataset(dataset, max_distance=args.max_distance, progress=not args.no_progress)
    out = Path(args.out) if args.out else Path("audit") / dataset.root.name
    write_audit(result, out)
    summary = result.summary()
    width = max(len(key) for key in summary)
    print(f"audit of {dataset.root} ({dataset.layout})")
    for key, value in summary.items():
        print(f"  {key.replace('_', ' '):<{width}}  {value}")
    if result.cross_split_pairs:
        print(f"  LEAKAGE: {len(result.cross_split_pairs)} duplicate pair(s) straddle two splits")
    print(f"report: {out / 'audit.html'} and {out / 'audit.json'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    run_dir = create_run_dir(out / "run", "demo")
    data_dir = write_synthetic_dataset(out / "data", n_per_class=args.n_per_class, seed=0)
    logger.info(
        "synthetic dataset: %s (%d benign, %d malignant)",
        data_dir,
        args.n_per_class,
        args.n_per_class,
    )
    overrides = [f"train.epochs={args.epochs}", "train.batch_size=16"]
    try:
        resolve_weights_file(get_weight_spec("vgg16", "imagenet"), download=False)
    except BusdxError as exc:
        logger.warning("%s\nthe demo goes on with random backbone weights", exc)
        overrides.append("model.weights=none")
    config = apply_overrides(load_config(), overrides)
    started = time.perf_counter()
    dataset = prepare_dataset(config, data_dir)
    save_run(run_dir, config, dataset)
    result = train_and_evaluate(config, dataset, run_dir, progress=not args.no_progress)
    examples = (
        sorted((data_dir / "malignant").glob("*.png"))[:2]
        + sorted((data_dir / "benign").glob("*.png"))[:2]
    )
    loaded = load_model(run_dir)
    print(format_metrics(result))
    for row in predict_files(loaded, examples, progress=False):
        print(f"  predict {Path(row.path).name}: p(malignant)={row.probability:.3f} -> {row.label}")
    if DEFAULT_MODEL in list_bundled():  # the model that ships: no training, no download
        print(f"the bundled model {DEFAULT_MODEL} (trained on real scans) on the same files:")
        for row in predict_files(load_model(resolve_run(None)), examples, progress=False):
            scope = f"out of scope ({row.scope_reason})" if row.out_of_scope else "in scope"
            print(f"  predict {Path(row.path).name}: p(malignant)={row.probability:.3f} -> "
                  f"{row.label}; {scope}")  # fmt: skip
    print(
        f"demo finished in {time.perf_counter() - started:.0f} s; outputs in {run_dir} "
        "(training_curves.png, sample_predictions.png, roc_curve.png, metrics.json, model.pt)"
    )
    return 0


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """Recipe, config file and overrides: the same flags for every command that trains."""
    parser.add_argument("--config", help="YAML config file (values over the recipe's)")
    parser.add_argument("--recipe", help=f"built-in recipe: {', '.join(list_recipes())}")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--weights", help="imagenet | none | PATH to a backbone state_dict")
    parser.add_argument("--device", help="auto | cpu | cuda")
    parser.add_argument("--split-file", help="re-use a split CSV (path,label,split columns)")
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any config value, e.g. --set augment.zoom=0.1",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="busdx",
        description="Benign vs malignant breast-ultrasound classification.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"busdx {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--no-progress", action="store_true", help="hide progress bars")
        sub.add_argument(
            "--any-modality", action="store_true",
            help="read DICOM files of any modality (default: ultrasound, US, only)",
        )  # fmt: skip

    def precision_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--precision", choices=PRECISIONS, default="fp32",
            help="torch backend: bf16 (GPU, or a CPU with avx512_bf16 / AMX) or fp16 (GPU) "
            "autocast",
        )  # fmt: skip

    train = commands.add_parser(
        "train",
        help="train a model (default recipe: vgg16-frozen)",
        description="Train a model; writes a complete run directory.",
    )
    train.add_argument(
        "--data",
        action="append",
        help="dataset folder (train/validation/<class> "
        "or <class>/); repeat it, optionally as NAME=DIR, for several sites",
    )
    train.add_argument("--out", help="new run directory (default runs/<recipe>-<time>)")
    train.add_argument("--resume", metavar="RUNDIR", help="continue an interrupted run")
    train.add_argument(
        "--export",
        action="store_true",
        help="then export ONNX and int8 (what predict and serve use by default on a CPU)",
    )
    add_config_options(train)
    common(train)
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser(
        "evaluate",
        help="metrics of a trained model on a split",
        description="Evaluate a run's best model on labelled data.",
    )
    evaluate.add_argument("--run", required=True, metavar="RUNDIR")
    evaluate.add_argument(
        "--data",
        action="append",
        help="dataset folder (default: the run's "
        "own data); repeat it for several sites, scored site by site",
    )
    evaluate.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    evaluate.add_argument("--out", help="output folder (default RUNDIR/eval/<site>-<split>)")
    evaluate.add_argument("--site", help="name of the images' site (default: the data folder's)")
    evaluate.add_argument(
        "--readers",
        metavar="CSV",
        help="readers' BI-RADS per image (default: DATA/labels.csv when it has the column)",
    )
    evaluate.add_argument("--reader-column", default="birads", help="column of reader scores")
    evaluate.add_argument(
        "--boxes", metavar="FILE",
        help="ROI model: lesion boxes CSV (path,x,y,w,h) instead of the data's lesion masks",
    )  # fmt: skip
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument(
        "--backend", choices=BACKENDS, default="torch", help="onnx: the exported (int8) model"
    )
    precision_option(evaluate)
    common(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    calibrate = commands.add_parser(
        "calibrate",
        help="refit temperature and threshold on a site's own labelled cases",
        description="Copy a run into a new run directory whose temperature and decision "
        "threshold are refitted on labelled cases from the site that will use it (the "
        "original run is left unchanged). Evaluate the new run on other cases of that site.",
    )
    calibrate.add_argument("--run", required=True, metavar="RUNDIR")
    calibrate.add_argument("--data", required=True, help="the site's labelled images")
    calibrate.add_argument("--split", default="all", choices=["train", "val", "test", "all"])
    calibrate.add_argument("--site", help="the site's name (default: the data folder's)")
    calibrate.add_argument("--out", help="new run directory (default RUNDIR-<site>)")
    calibrate.add_argument("--device", default="auto")
    calibrate.add_argument(
        "--refit-head",
        action="store_true",
        help="also refit the head's last layer on these cases, anchored to the trained one "
        "(strength chosen by cross-validation; threshold from out-of-fold scores)",
    )
    calibrate.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="e.g. evaluate.target_sensitivity=0.98"
    )
    common(calibrate)
    calibrate.set_defaults(func=cmd_calibrate)

    compare = commands.add_parser(
        "compare",
        help="paired bootstrap of two models on the same images",
        description="Compare two evaluations of the same images (run directories, whose test "
        "split is evaluated at their top, folders from busdx evaluate, or busdx cv folders, "
        "pooled over their folds): ROC AUC, sensitivity and specificity of A minus B, with "
        "paired bootstrap CIs.",
    )
    compare.add_argument("a", metavar="RUN_OR_EVAL_A")
    compare.add_argument("b", metavar="RUN_OR_EVAL_B")
    compare.add_argument("--out", help="also write the result as JSON here")
    compare.add_argument("--n-bootstrap", type=int, default=2000)
    compare.set_defaults(func=cmd_compare)

    predict = commands.add_parser(
        "predict",
        help="probability of malignancy for images",
        description="Predict image files and/or folders of images.",
    )
    predict.add_argument(
        "--run", metavar="RUNDIR",
        help=f"run directory, model.pt, or a bundled model's name (default: the bundled "
        f"{DEFAULT_MODEL}; see busdx models)",
    )  # fmt: skip
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders")
    predict.add_argument("--out", help="write .csv or .json here (default: CSV to stdout)")
    predict.add_argument("--threshold", type=float, help="decision threshold (default: model's)")
    predict.add_argument("--batch-size", type=int, default=16)
    predict.add_argument("--device", default="auto", help="torch backend: auto | cpu | cuda")
    predict.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="auto (default): the exported int8 model when valid on a CPU, else model.pt; "
        "torch (model.pt); onnx (model.int8.onnx if exported, else model.onnx)",
    )
    predict.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    predict.add_argument(
        "--workers", type=int, default=-1,
        help="processes decoding the next images while the model runs (default -1: auto)",
    )  # fmt: skip
    predict.add_argument(
        "--shard", metavar="I/N",
        help="only every N-th image, starting at the I-th (I = 0..N-1): one job of an array",
    )  # fmt: skip
    precision_option(predict)
    predict.add_argument(
        "--ray", action="store_true",
        help="run on Ray with the exported ONNX model; needs --out; resumable: re-run to "
        "finish after a failure",
    )  # fmt: skip
    predict.add_argument(
        "--ray-address", default="local", metavar="ADDRESS",
        help="local (default: start Ray on this machine), auto, or ray://host:10001",
    )  # fmt: skip
    predict.add_argument(
        "--ray-workers", type=int, default=2, help="Ray model actors (one CPU each)"
    )
    predict.add_argument(
        "--explain", metavar="OUTDIR", help="also write Grad-CAM overlays (PNG) into OUTDIR"
    )
    predict.add_argument(
        "--frame", default="0", metavar="N|all",
        help="DICOM frame to classify (default 0, the first), or all: one row per frame",
    )  # fmt: skip
    predict.add_argument(
        "--box", metavar="X,Y,W,H",
        help="lesion box of the one image, in its pixels (for a model trained on boxes)",
    )  # fmt: skip
    predict.add_argument(
        "--boxes", metavar="FILE",
        help="CSV of lesion boxes: a path column and x, y, w, h (or box) columns",
    )  # fmt: skip
    common(predict)
    predict.set_defaults(func=cmd_predict)

    serve_parser = commands.add_parser(
        "serve",
        help="web app and REST API",
        description="Serve a run's model: web page at /, API at /predict, /explain, /model, "
        "/health, docs at /docs. Research use only; not a medical device.",
    )
    serve_parser.add_argument(
        "--run", metavar="RUNDIR",
        help=f"run directory or a bundled model's name (default: the bundled {DEFAULT_MODEL})",
    )  # fmt: skip
    serve_parser.add_argument("--host", default="127.0.0.1")
    serve_parser.add_argument("--port", type=int, default=8000)
    serve_parser.add_argument(
        "--backend",
        choices=BACKENDS,
        help="auto (default: int8 ONNX when exported and valid), torch or onnx; env BUSDX_BACKEND",
    )
    serve_parser.add_argument(
        "--api-key", help="required in the X-API-Key header (default: $BUSDX_API_KEY)"
    )
    serve_parser.add_argument(
        "--no-api-key", action="store_true", help="allow a non-loopback host without a key"
    )
    serve_parser.add_argument(
        "--cors-origin", action="append", metavar="ORIGIN", help="allow this origin (CORS)"
    )
    limits = {  # option: (type, help); defaults and BUSDX_* variables come from ServeSettings
        "--max-upload-mb": (float, "whole request body (default 20)"),
        "--max-pixels": (int, "per image (default 50,000,000)"),
        "--max-files": (int, "per /predict request (default 32)"),
        "--workers": (int, "model calls at a time (default 1)"),
        "--queue-size": (int, "waiting requests; more get 503 (default 64)"),
    }
    for option, (kind, text) in limits.items():
        variable = "BUSDX_" + option[2:].replace("-", "_").upper()
        serve_parser.add_argument(option, type=kind, help=f"{text}; env {variable}")
    serve_parser.set_defaults(func=cmd_serve)

    export = commands.add_parser(
        "export",
        help="ONNX (and int8) model for fast CPU inference",
        description="Export RUNDIR/model.pt to RUNDIR/model.onnx and, with --int8, a "
        "statically quantized RUNDIR/model.int8.onnx checked against fp32 on validation images.",
    )
    export.add_argument("--run", required=True, metavar="RUNDIR")
    export.add_argument("--format", choices=["onnx"], default="onnx")
    export.add_argument("--int8", action="store_true", help="also write an int8 model")
    export.add_argument(
        "--calibration", metavar="DIR", help="calibration images (default: training split)"
    )
    export.add_argument("--calibration-size", type=int, default=100, metavar="N")
    export.add_argument(
        "--int8-weight-bits", type=int, choices=[7, 8], default=7,
        help="7 (default) runs on any x86-64 CPU; 8 keeps compact models such as "
        "EfficientNet-Lite closer to fp32, and is used only on CPUs with VNNI or AMX",
    )  # fmt: skip
    export.add_argument("--data", help="the run's dataset folder, if it has moved")
    export.add_argument(
        "--max-auc-drop",
        type=float,
        default=0.01,
        help="refuse an int8 model whose validation AUC drops more (default 0.01)",
    )
    export.add_argument(
        "--allow-auc-drop", action="store_true", help="keep the int8 model whatever its AUC"
    )
    export.set_defaults(func=cmd_export)

    cv = commands.add_parser(
        "cv",
        help="grouped stratified k-fold cross-validation",
        description="Cross-validate a recipe with near-duplicate groups kept within one fold; "
        "re-running the same command resumes unfinished folds.",
    )
    cv.add_argument(
        "--data",
        required=True,
        action="append",
        help="dataset folder; repeat it, optionally as NAME=DIR, for several sites",
    )
    cv.add_argument(
        "--group-by",
        choices=("duplicates", "site"),
        default="duplicates",
        help="folds keep near-duplicate groups whole (default), or leave one site "
        "out per fold (--folds is then the number of sites)",
    )
    cv.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    cv.add_argument("--out", help="output folder (default runs/cv-<recipe>)")
    add_config_options(cv)
    common(cv)
    cv.set_defaults(func=cmd_cv)

    report = commands.add_parser(
        "report",
        help="HTML report and model card of a run",
        description="Write RUNDIR/report.html (self-contained) and RUNDIR/MODEL_CARD.md.",
    )
    report.add_argument("run", metavar="RUNDIR")
    report.set_defaults(func=cmd_report)

    models = commands.add_parser(
        "models",
        help="list the models that ship with busdx",
        description="List the bundled models (busdx predict and serve use the default one when "
        "no --run is given), with what to expect of each at a hospital it never saw.",
    )
    models.set_defaults(func=cmd_models)

    audit = commands.add_parser(
        "audit",
        help="counts, broken files, duplicates and leakage",
        description="Audit a dataset: class counts, image sizes and modes, unreadable files, "
        "exact and near-duplicate images, and duplicates that straddle two splits.",
    )
    audit.add_argument("--data", required=True, help="dataset folder")
    audit.add_argument("--split-file", help="check this split (path,label,split CSV) for leaks")
    audit.add_argument("--out", help="report folder (default audit/<data name>)")
    audit.add_argument(
        "--max-distance",
        type=int,
        default=DEFAULT_MAX_DISTANCE,
        help="perceptual-hash bits (of 63) that still count as duplicate "
        f"(default {DEFAULT_MAX_DISTANCE})",
    )
    audit.add_argument("--exclude-normal", action="store_true", help="skip normal/ folders")
    common(audit)
    audit.set_defaults(func=cmd_audit)

    demo = commands.add_parser(
        "demo",
        help="synthetic data, train, evaluate, predict",
        description="End-to-end run on generated images; no download.",
    )
    demo.add_argument(
        "--out",
        default="busdx-demo",
        help="parent folder; each demo writes a new <time>/ folder inside it",
    )
    demo.add_argument("--n-per-class", type=int, default=50)
    demo.add_argument("--epochs", type=int, default=5)
    common(demo)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("busdx").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    if getattr(args, "any_modality", False):  # worker processes inherit it
        os.environ[ANY_MODALITY_ENV] = "1"
    try:
        return args.func(args)
    except BusdxError as exc:
        if os.environ.get("BUSDX_DEBUG"):
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"busdx: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("busdx: interrupted (a training run continues with --resume RUNDIR)", file=sys.stderr)
        return 130
