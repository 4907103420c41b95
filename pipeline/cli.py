"""camlabel's command line: annotate, export-coco, export-masks, calibrate, train, report, runs, eval, demo."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import fields
from importlib import metadata
from pathlib import Path

from ..schemas.config import AnnotateSettings, ConfigError, JobConfig, UserError, load_config
from .evaluate import evaluate, evaluate_label_maps
from .signals import Stopped, stopped_by_signals
from .sources import IMAGE_SUFFIXES, is_glob
from .writers import RunError

log = logging.getLogger("camlabel")


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number from 0 to 1")
    return value


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (0 or more)")
    return int(text)


def _annotate_flags(parser: argparse.ArgumentParser) -> None:
    """Every JobConfig field as a flag, its help from the field; defaults stay None so a YAML config is
    only overridden on purpose (the defaults are the fields')."""
    parser.add_argument("source", nargs="?", help=JobConfig.__dataclass_fields__["source"].metadata["help"])
    parser.add_argument("--config", help="YAML file with any of the fields below")
    settings = [f for f in fields(JobConfig) if f.name in AnnotateSettings.__dataclass_fields__]
    for f in [f for f in fields(JobConfig) if f not in settings and f.name != "source"] + settings:
        flag = "--" + f.name.replace("_", "-")
        shown = f"{f.metadata['help']}" + (f" (default {f.default})" if f.default not in (None, "", False) else "")
        if "bool" in f.type:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=shown)
        else:
            kind = _floats if "tuple" in f.type else float if "float" in f.type else int if "int" in f.type else str
            parser.add_argument(flag, type=kind, help=shown)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="camlabel", description="Pseudo-labels from class activation maps.")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--version", action="version", version=f"camlabel {metadata.version('camlabel')}")
    sub = parser.add_subparsers(dest="command", required=True)
    _annotate_flags(sub.add_parser("annotate", help="annotate an image collection with Ray"))
    demo = sub.add_parser("demo", help="annotate the bundled demo photos and export COCO")
    demo.add_argument("--out", default="runs/demo")
    export = sub.add_parser("export-coco", help="write a run (or several) as COCO JSON")
    export.add_argument("runs", nargs="+", help="run directories or incremental roots (paths or URIs)")
    export.add_argument("--out", required=True, type=Path)
    what = export.add_mutually_exclusive_group()
    what.add_argument("--results", action="store_true", help="the list COCO.loadRes expects")
    what.add_argument("--shard-size", type=_positive, metavar="N",
                      help="one COCO file per N images beside OUT (OUT-00000.json, ...); OUT indexes them")
    export.add_argument("--image-root", metavar="DIR", help="name the images below DIR (a folder or URI) relative "
                                                           "to it, as COCO does; others keep their whole path "
                                                           "(default: every image's whole path)")
    export.add_argument("--min-score", type=_share, default=0.0, metavar="S",
                        help="leave out boxes scoring under S (0-1; eval and calibrate say what each score is "
                             "worth); every image stays (default 0: every box)")
    masks = sub.add_parser("export-masks", help="one PNG label map per image, with an ignore band")
    masks.add_argument("run", help="run directory (path or URI)")
    masks.add_argument("--out", required=True, type=Path)
    masks.add_argument("--ignore-band", nargs=2, type=float, default=(0.3, 0.6), metavar=("LOW", "HIGH"),
                       help="fractions of a map's max: below LOW background, from HIGH the class, between ignored")
    masks.add_argument("--format", choices=("voc", "plain"), default="voc",
                       help="voc: 8-bit palette PNG (<= 254 classes); plain: grey values (16-bit above 254)")
    cal = sub.add_parser("calibrate", help="choose box and mask thresholds on images with ground truth")
    _annotate_flags(cal)
    cal.add_argument("--gt", required=True, type=Path, help="COCO ground truth for (some of) the SOURCE images")
    cal.add_argument("--predicted", action="store_true", help="calibrate for predicted classes, not labels")
    tr = sub.add_parser("train", help="fine-tune a classifier into a GAP localizer on image-level labels")
    tr.add_argument("images", help="folder of images (one sub-folder per class when there is no --labels)")
    tr.add_argument("--labels", help="CSV: file_name, labels (as for annotate)")
    tr.add_argument("--out", required=True, help="MODEL_DIR to write")
    for name, kind, text in (("backbone", str, "torchvision classifier (default mobilenet_v2)"),
                             ("weights", str, "'bundled', a local file, or 'none' for random init"),
                             ("epochs", int, "passes over the training images (default 6)"),
                             ("ggam", float, "lambda of the Grad-CAM guided attention loss (default 0: off)"),
                             ("batch-size", int, "images a step (default 16)"),
                             ("input-size", int, "training crop in pixels (default 224)"),
                             ("lr", float, "learning rate of the new head (default 3e-4; the trunk's is a tenth)"),
                             ("val-fraction", float, "share of images held out to validate (default 0.1)"),
                             ("seed", int, "random seed (default 0)"),
                             ("workers", int, "more than 1: Ray Train data-parallel workers (one GPU each)"),
                             ("address", str, "Ray cluster address for --workers (default: RAY_ADDRESS, else local)")):
        tr.add_argument(f"--{name}", type=kind, help=text)
    rep = sub.add_parser("report", help="an HTML page to audit a run: counts, histograms, overlays")
    rep.add_argument("run", help="run directory (path or URI)")
    rep.add_argument("--out", type=Path, help="folder for report.html and overlays/ (default RUN/report for a "
                     "local RUN)")
    rep.add_argument("--gallery", type=_count, default=48, help="images shown, lowest confidence first")
    rep.add_argument("--images", nargs="*", default=[], help="file names always drawn (PNG overlays)")
    runs = sub.add_parser("runs", help="list the runs under an incremental output root")
    runs.add_argument("root", help="path or URI")
    ev = sub.add_parser("eval", help="score predictions against COCO ground truth")
    ev.add_argument("--gt", required=True, type=Path)
    what = ev.add_mutually_exclusive_group(required=True)
    what.add_argument("--pred", help="COCO results list or COCO dataset, or a run or incremental root (path or URI), "
                                     "scored as export-coco writes it")
    what.add_argument("--label-maps", type=Path, help="folder of PNG label maps (camlabel export-masks)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    shown = logging.StreamHandler()
    shown.setFormatter(PrintableFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, handlers=[shown])
    try:
        with stopped_by_signals():  # SIGTERM unwinds too: no command leaves a temporary file behind
            return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"camlabel {args.command}: {printable(str(exc))}", file=sys.stderr)
        return 2
    except Stopped as stop:
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()  # now: what Ray's processes print as they go comes before the last line
        kept = (f"{stop.kept} images are kept in finished parts under {stop.run_dir}; run the same command to resume"
                if stop.run_dir else "no file is left half-written")
        print(f"camlabel {args.command}: stopped by {stop.signal}; {kept}", file=sys.stderr)
        return 128 + signal.Signals[stop.signal].value


def printable(message: str) -> str:
    """message in one line a terminal shows as written: control characters (a newline, an escape sequence quoted
    from a hostile file or file name) escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in message)


class PrintableFormatter(logging.Formatter):
    """Log lines as error lines are: a file name's control characters escaped (a warning names skipped files)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))


def writable(folder: Path) -> Path:
    """folder, once a file could be written in it: a command fails before its work, in one line naming the
    folder, not with a traceback after it (a file of that name, a read-only parent). The folders made to
    check are removed again: a command refused later (a bad run, no images) leaves none behind, and each
    command makes its output's folder as it writes there."""
    made = []
    try:
        for parent in reversed((folder, *folder.parents)):
            if not parent.is_dir():
                parent.mkdir()
                made.append(parent)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ConfigError(f"out: cannot write in {folder}: {exc}") from None
    finally:
        for parent in reversed(made):
            with contextlib.suppress(OSError):  # unless another process wrote there meanwhile
                parent.rmdir()
    return folder


def cmd_annotate(args) -> int:
    from .job import annotate

    names = {f.name for f in fields(JobConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    config = load_config(args.config, overrides)
    manifest = annotate(config)
    counts = manifest["counts"]
    print(json.dumps({"out": manifest["run_dir"], **counts, "seconds": manifest["seconds"]}))
    if not counts["inputs"] and is_glob(config.source):  # a mistyped pattern, not a run that found nothing new
        log.warning("%s matches no file (a pattern's letters match in their own case)", config.source)
    elif not counts["inputs"]:  # an empty folder or manifest, or a folder of other kinds of file
        log.warning("%s lists no images (%s)", config.source, " ".join(sorted(IMAGE_SUFFIXES)))
    if counts["errors"] and not counts["annotated"]:  # a scheduled job must not pass for one that worked
        print(f"camlabel annotate: no image was annotated; the reasons of all {counts['errors']} are in "
              f"{printable(manifest['run_dir'])}/errors", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args) -> int:
    """The bundled default: scikit-image's real photos, predicted classes, COCO export."""
    import skimage

    from ..schemas.tables import IMAGES
    from .export import export_coco
    from .job import annotate
    from .report import NAMED_FROM, found, write_report
    from .writers import read_parts

    data = Path(skimage.data.data_dir)
    photos = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "horse.png",
              "camera.png"]
    out = writable(Path(args.out))
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "demo_manifest.csv"
    manifest_path.write_text("path\n" + "".join(f"{data / p}\n" for p in photos))
    earlier = out / "run" / "manifest.json"
    if earlier.is_file() and Path(json.loads(earlier.read_text())["source"]).resolve() == manifest_path.resolve():
        shutil.rmtree(out / "run")  # an earlier demo's run: made again (seconds), so it shows this camlabel's labels
    config = load_config(None, {"source": str(manifest_path), "out": str(out / "run")})
    manifest = annotate(config)
    export_coco([out / "run"], out / "coco.json")
    page = write_report(out / "run", out / "report")
    print(f"camlabel found, with no labels given (each box: the class its crop looks like, and its score; "
          f"boxes under {NAMED_FROM} are counted, not named):")
    rows = read_parts(out / "run" / "annotations", IMAGES, ["path", "annotations"]).to_pylist()
    for row in sorted(rows, key=lambda r: r["path"]):
        print(f"  {Path(row['path']).name:22} {found(row['annotations'])}")
    print(f"Pictures: {page} (open it in a browser; boxes, masks and heatmaps for every photo)")
    print(json.dumps({"run": str(out / "run"), "coco": str(out / "coco.json"), "report": str(page),
                      **manifest["counts"], "seconds": manifest["seconds"]}))
    return 0


def cmd_calibrate(args) -> int:
    """Thresholds for this model and these settings, written as a YAML file for `annotate --config`."""
    from ..workers.models import load_model
    from .calibrate import calibrate, calibrated_config
    from .writers import atomic_write_bytes

    names = {f.name for f in fields(JobConfig)}
    config = load_config(args.config, {k: v for k, v in vars(args).items() if k in names})
    loaded = load_model(config.model, config.weights, config.class_names, config.target_layer,
                        model_dir=config.model_dir)
    writable(Path(config.out).parent)
    result = calibrate(config.source, args.gt, loaded, config.resolved(), use_labels=not args.predicted)
    atomic_write_bytes(Path(config.out), calibrated_config(config, result).encode())
    print(json.dumps({"out": config.out, **result}, indent=2))
    return 0


def cmd_train(args) -> int:
    from .train import TrainConfig, train

    given = {k: v for k, v in vars(args).items() if k in {f.name for f in fields(TrainConfig)} and v is not None}
    if str(given.get("weights", "")).lower() == "none":
        given["weights"] = None
    config = TrainConfig(**given).validate()  # its fields checked first
    writable(Path(args.out))
    spec = train(config)
    print(json.dumps({"out": args.out, "classes": len(spec["classes"]), **spec["history"][-1]}))
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    if args.out is None and "://" in args.run:
        raise ConfigError(f"out: give --out for a report on {args.run} (the report is written locally)")
    page = write_report(args.run, writable(args.out or Path(args.run) / "report"), args.gallery, args.images)
    print(json.dumps({"report": str(page)}))
    return 0


def cmd_export(args) -> int:
    from .export import export_coco

    if args.out.is_dir():
        raise ConfigError(f"out: {args.out} is a folder; give the JSON file to write")
    writable(args.out.parent)
    root = args.image_root and (args.image_root if "://" in args.image_root else os.path.abspath(args.image_root))
    summary = export_coco(args.runs, args.out, results=args.results, image_root=root, shard_size=args.shard_size,
                          min_score=args.min_score)
    print(json.dumps({k: v for k, v in summary.items() if k != "shards"}))
    return 0


def cmd_runs(args) -> int:
    from .job import list_runs

    runs = list_runs(args.root)
    if not runs:
        raise RunError(f"{args.root} holds no runs (a run holds manifest.json, an incremental output root "
                       "runs/<run-id>/manifest.json)")
    for run in runs:
        counts = run.get("counts", {})
        print(json.dumps({"run": run["run"], "series": run.get("series"), "status": run.get("status"),
                          "started": run.get("started"), "method": run["config"]["method"],
                          "model": run["model"]["name"], **counts}))
    return 0


def cmd_eval(args) -> int:
    if args.label_maps:
        result = evaluate_label_maps(args.gt, args.label_maps)
    elif "://" in args.pred or Path(args.pred).is_dir():  # a run or a root: scored as its `export-coco` would be
        from .export import export_coco

        with tempfile.TemporaryDirectory(prefix="camlabel-eval-") as scratch:
            export_coco([args.pred], Path(scratch) / "pred.json")
            result = evaluate(args.gt, Path(scratch) / "pred.json")
    else:
        result = evaluate(args.gt, args.pred)
    print(json.dumps(result, indent=2))
    return 0


def cmd_export_masks(args) -> int:
    from .masks import export_masks

    low, high = args.ignore_band
    if not 0 <= low <= high <= 1:
        raise ConfigError(f"ignore-band: {low} {high} is not allowed; 0 <= LOW <= HIGH <= 1")
    summary = export_masks(args.run, writable(args.out), low, high, palette=args.format == "voc")
    print(json.dumps({k: summary[k] for k in ("images", "low", "high", "ignore")} | {"out": str(args.out)}))
    return 0


COMMANDS = {"annotate": cmd_annotate, "demo": cmd_demo, "export-coco": cmd_export, "export-masks": cmd_export_masks,
            "runs": cmd_runs, "eval": cmd_eval, "train": cmd_train, "report": cmd_report,
            "calibrate": cmd_calibrate}


if __name__ == "__main__":
    sys.exit(main())
