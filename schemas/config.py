"""The annotate job's configuration: one dataclass, filled from a YAML file and/or flags, validated
before anything starts, with errors that name the field and what is allowed."""

from __future__ import annotations

import reprlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

# The settings' vocabulary, defined here once: the workers implement these names (tests check each one).
METHODS = ("cam", "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "eigencam", "scorecam", "occlusion",
           "deconvnet", "guided")
RULES = ("paper", "instances")
PRECISIONS = ("auto", "float32", "bfloat16")
OUTPUT_SCHEMES = ("s3", "gs", "gcs")  # object stores pyarrow writes to (credentials from the environment)


class UserError(ValueError):
    """Input the user can fix (a config, a source, a model, predictions): the CLI prints its message in
    one line and exits 2, no traceback."""


class ConfigError(UserError):
    """A configuration value that is not allowed; str() names the field."""

    @classmethod
    def refused(cls, name: str, value, allowed: str) -> ConfigError:
        """`name: value is not allowed; allowed`, the value's repr kept short: a YAML file's aliases can nest
        a billion items in a few lines (a full repr took 30 s and 1.6 GB at 43 million)."""
        return cls(f"{name}: {_SHORT.repr(value)} is not allowed; {allowed}")


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict, _SHORT.maxstring = 2, 4, 4, 4, 200


# Input sizes, as multiples of input_size, whose maps are averaged: objects are cut from the mean of all but
# the smallest, large objects (workers.boxes.LARGE_OBJECT_RULE) from the mean of all but the largest.
SCALES = (1.0, 1.5, 2.0)
# Eigen-CAM's map is the layer's first principal component, class-agnostic: at larger sizes the object
# dominates the layer's variance less, so Eigen-CAM keeps smaller scales and higher thresholds, one
# extent (bench/README.md measures both defaults for it).
# Score-CAM and occlusion pay one forward pass per channel or patch position: one scale, no mirror.
METHOD_DEFAULTS = {"eigencam": {"scales": (1.0, 1.5), "threshold": 0.6, "mask_threshold": 0.65},
                   "scorecam": {"scales": (1.0,), "flip": False},
                   "occlusion": {"scales": (1.0,), "flip": False}}


def setting(default, help: str):
    """A field with its help text: the CLI's flags are made from these (pipeline.cli)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class AnnotateSettings:
    """What to compute for each image. Image-level labels, when given, choose the classes mapped;
    otherwise the top_k classes whose evidence peaks highest anywhere in the image propose regions and
    each region is named by its crop's best class, kept when that class's probability is at least
    min_score (workers.regions).
    Scales, flip and thresholds left None take the method's defaults (METHOD_DEFAULTS, else SCALES, a
    mirror and the rule's thresholds)."""

    method: str = setting("cam", f"one of {', '.join(METHODS)}")
    input_size: int = setting(448, "shorter side in pixels, at the image's own aspect ratio")
    rule: str = setting("instances", "instances, or paper (Zhou et al.'s 20%% rule, largest component)")
    threshold: float | None = setting(None, "fraction of the refined map's max that seeds an object (default: "
                                      "the rule's, 0.45; eigencam 0.6)")
    mask_threshold: float | None = setting(None, "the same for masks (default: threshold if given, else the "
                                           "rule's, 0.5; eigencam 0.65)")
    top_k: int = setting(5, "without labels: the classes whose evidence peaks highest propose regions (and one "
                         "more, the best of those that win some cells of their own)")
    min_score: float = setting(0.1, "without labels: a region's crop must name its class with this probability")
    flip: bool | None = setting(None, "average with the mirrored image's maps, at every scale but the largest "
                                "of several (default: yes; not for scorecam and occlusion)")
    scales: tuple[float, ...] | None = setting(None, "input sizes whose maps are averaged, as multiples of "
                                               f"input_size (default {','.join(map(str, SCALES))}; per method: "
                                               "eigencam 1.0,1.5, scorecam and occlusion 1.0)")
    refine: bool = setting(True, "refine maps with the model's features and the image's colours (a spread along "
                           "feature similarity, a colour model, then a random walk)")
    precision: str = setting("auto", "the model's passes: auto (bfloat16 autocast where the device computes it "
                             "natively: CUDA GPUs, CPUs with AVX512-BF16 or AMX; else float32), float32 or "
                             "bfloat16. Maps and all after them stay float32")

    def __post_init__(self) -> None:
        if isinstance(self.scales, list):  # from YAML
            object.__setattr__(self, "scales", tuple(self.scales))
        self.check()

    def check(self) -> None:
        def fail(name: str, allowed: str) -> None:
            raise ConfigError.refused(name, getattr(self, name), allowed)

        if self.method not in METHODS:
            fail("method", f"one of {', '.join(METHODS)}")
        if self.rule not in RULES:
            fail("rule", f"one of {', '.join(RULES)}")
        if self.precision not in PRECISIONS:
            fail("precision", f"one of {', '.join(PRECISIONS)}")
        if not isinstance(self.input_size, int) or not 32 <= self.input_size <= 2048:
            fail("input_size", "an integer from 32 to 2048 (shorter side in pixels)")
        for name in ("threshold", "mask_threshold"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 1:
                fail(name, "a fraction of the map's max, between 0 and 1")
        if self.scales is not None and not (self.scales and all(
                isinstance(x, (int, float)) and 0.25 <= x <= 4 for x in self.scales)
                and len(set(self.scales)) == len(self.scales)):
            fail("scales", "a non-empty list of distinct multiples of input_size between 0.25 and 4")
        if not 0 <= self.min_score <= 1:
            fail("min_score", "a probability between 0 and 1")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            fail("top_k", "an integer >= 1")

    def resolved(self) -> AnnotateSettings:
        """Only the annotate settings (of a JobConfig), with what was left unset taken from the method's
        defaults (done late, so that `replace(settings, method=...)` gets the new method's defaults)."""
        values = {f.name: getattr(self, f.name) for f in fields(AnnotateSettings)}
        defaults = METHOD_DEFAULTS.get(self.method, {})
        if values["scales"] is None:
            values["scales"] = tuple(defaults.get("scales", SCALES))
        if values["flip"] is None:
            values["flip"] = defaults.get("flip", True)
        if self.rule == "instances" and self.threshold is None and self.mask_threshold is None and (
                "threshold" in defaults):
            values |= {"threshold": defaults["threshold"], "mask_threshold": defaults["mask_threshold"]}
        return AnnotateSettings(**values)


@dataclass(frozen=True)
class JobConfig(AnnotateSettings):
    """The annotate job: where from, where to, which model, how many workers, and the settings above."""

    source: str = setting("", "an image, a folder (recursive), a glob, a .csv/.parquet manifest, or a URI")
    out: str = setting("", "run directory (with --incremental: a root of runs; calibrate: the YAML to write)")
    labels: str | None = setting(None, "CSV: file_name, labels (class indices or names, space-separated)")
    model: str = setting("mobilenet_v2", "torchvision classifier name")
    weights: str | None = setting("bundled", "'bundled', 'DEFAULT' (torchvision download) or a local file")
    class_names: str | None = setting(None, "text file, one class name a line")
    model_dir: str | None = setting(None, "a localizer folder written by `camlabel train` (replaces model, "
                                    "weights, class_names)")
    target_layer: str | None = setting(None, "layer whose maps are used (default: found automatically)")
    actors: int | None = setting(None, "annotate actors (default: one per GPU, else one per core)")
    gpus_per_actor: float | None = setting(None, "GPUs per actor (default 1 with GPUs; 0.5 puts two on one GPU)")
    batch_size: int | None = setting(None, "images the model takes at once (default 32 on GPU, 8 on CPU)")
    part_size: int | None = setting(None, "images per part, the most a crash loses (default 256 on GPU, 32 on "
                                    "CPU; at least batch_size)")
    incremental: bool = setting(False, "out is a root of runs/<run-id>/; annotate only what earlier runs of "
                                "the same model, weights, method and settings have not")
    address: str | None = setting(None, "Ray cluster address (default: RAY_ADDRESS, else a private local Ray)")

    def check(self) -> None:
        super().check()

        def fail(name: str, allowed: str) -> None:
            raise ConfigError.refused(name, getattr(self, name), allowed)

        if not self.source:
            fail("source", "give an image, a folder, a glob, a .csv/.parquet manifest or a URI")
        if not self.out:
            fail("out", "give the run directory")
        if "://" in self.out and self.out.split("://")[0] not in OUTPUT_SCHEMES:
            fail("out", "a path every worker sees (a local disk, a shared volume) or an object-store URI "
                 "(s3://, gs://)")
        for name in ("actors", "batch_size", "part_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                fail(name, "an integer >= 1")
        if self.gpus_per_actor is not None and not 0 <= self.gpus_per_actor <= 8:
            fail("gpus_per_actor", "a number from 0 to 8")
        if self.labels is not None and not Path(self.labels).is_file():
            fail("labels", "a CSV file with columns file_name, labels")
        if self.model_dir is not None and not (Path(self.model_dir) / "localizer.json").is_file():
            fail("model_dir", "a folder written by `camlabel train` (with localizer.json)")
        if self.weights not in (None, "bundled", "DEFAULT") and not Path(self.weights).is_file():
            fail("weights", "'bundled', 'DEFAULT' or an existing .pt/.pth/.safetensors file")
        if self.class_names is not None and not Path(self.class_names).is_file():
            fail("class_names", "a text file, one class name a line")

    def as_dict(self) -> dict:
        return asdict(self)


def load_config(path: str | Path | None, overrides: dict) -> JobConfig:
    """YAML values first, then every flag the user actually gave; unknown keys are errors."""
    values: dict = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:  # `[[[...]]]`: too deep to parse
            raise ConfigError(f"config: cannot read {path}: {type(exc).__name__}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config: {path} must hold a mapping of field: value")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name: f for f in fields(JobConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown field; fields are {', '.join(known)}")
    for name, value in values.items():
        expected = known[name].type
        if name == "scales":
            if not isinstance(value, list):
                raise ConfigError.refused("scales", value, "a list of numbers, e.g. [1.0, 1.5]")
            continue
        if expected.startswith("str") and value is not None:
            if isinstance(value, (list, dict)):
                raise ConfigError.refused(name, value, "a string")
            values[name] = value = str(value)  # a YAML number (out: 2024) names a folder as well
        if "int" in expected and "float" not in expected and isinstance(value, float) and value.is_integer():
            values[name] = int(value)
        if "bool" in expected and not isinstance(value, bool):
            raise ConfigError.refused(name, value, "true or false")
        if ("int" in expected or "float" in expected) and value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError.refused(name, value, "a number")
    return JobConfig(**values)
