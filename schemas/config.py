"""The annotate job's configuration: one dataclass, filled from a YAML file and/or flags, validated
before anything starts, with errors that name the field and what is allowed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

# The settings' vocabulary, defined here once: the workers implement these names (tests check each one).
METHODS = ("cam", "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "eigencam", "scorecam", "occlusion",
           "deconvnet", "guided")
RULES = ("paper", "instances")
PRECISIONS = ("auto", "float32", "bfloat16")


class ConfigError(ValueError):
    """A configuration value that is not allowed; str() names the field."""


@dataclass
class JobConfig:
    source: str = ""
    out: str = ""
    labels: str | None = None
    model: str = "mobilenet_v2"
    weights: str | None = "bundled"
    class_names: str | None = None
    model_dir: str | None = None  # a folder written by `camlabel train`; replaces model, weights, class_names
    target_layer: str | None = None
    method: str = "cam"
    input_size: int = 448
    rule: str = "instances"
    threshold: float | None = None
    mask_threshold: float | None = None
    top_k: int = 5
    min_score: float = 0.1
    scales: list[float] | None = None  # None: the method's (workers.annotator)
    flip: bool | None = None  # None: the method's (workers.annotator)
    refine: bool = True
    precision: str = "auto"
    actors: int | None = None
    gpus_per_actor: float | None = None
    batch_size: int | None = None
    incremental: bool = False  # out is a root of runs/<run-id>/; skip what earlier runs annotated
    address: str | None = None

    def validate(self) -> JobConfig:
        def fail(field: str, allowed: str) -> None:
            raise ConfigError(f"{field}: {getattr(self, field)!r} is not allowed; {allowed}")

        if not self.source:
            fail("source", "give a folder, a glob, a .csv/.parquet manifest or a URI")
        if not self.out:
            fail("out", "give the run directory")
        if self.method not in METHODS:
            fail("method", f"one of {', '.join(METHODS)}")
        if self.rule not in RULES:
            fail("rule", f"one of {', '.join(RULES)}")
        if self.precision not in PRECISIONS:
            fail("precision", f"one of {', '.join(PRECISIONS)}")
        if not 32 <= self.input_size <= 2048:
            fail("input_size", "an integer from 32 to 2048 (shorter side in pixels)")
        for name in ("threshold", "mask_threshold"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 1:
                fail(name, "a fraction of the map's max, between 0 and 1")
        if self.scales is not None and not (self.scales and all(
                isinstance(x, (int, float)) and 0.25 <= x <= 4 for x in self.scales)):
            fail("scales", "a non-empty list of multiples of input_size between 0.25 and 4")
        if not 0 <= self.min_score <= 1:
            fail("min_score", "a probability between 0 and 1")
        for name, low in (("top_k", 1), ("actors", 1), ("batch_size", 1)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < low):
                fail(name, f"an integer >= {low}")
        if self.gpus_per_actor is not None and not 0 <= self.gpus_per_actor <= 8:
            fail("gpus_per_actor", "a number from 0 to 8")
        if self.labels is not None and not Path(self.labels).is_file():
            fail("labels", "a CSV file with columns file_name, labels")
        if self.model_dir is not None and not (Path(self.model_dir) / "localizer.json").is_file():
            fail("model_dir", "a folder written by `camlabel train` (with localizer.json)")
        if self.weights not in (None, "bundled", "DEFAULT") and not Path(self.weights).is_file():
            fail("weights", "'bundled', 'DEFAULT' or an existing .pt/.pth/.safetensors file")
        return self

    def as_dict(self) -> dict:
        return asdict(self)


def load_config(path: str | Path | None, overrides: dict) -> JobConfig:
    """YAML values first, then every flag the user actually gave; unknown keys are errors."""
    values: dict = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"config: cannot read {path}: {exc}") from exc
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
                raise ConfigError(f"scales: {value!r} is not allowed; a list of numbers, e.g. [1.0, 1.5]")
            continue
        if "int" in expected and "float" not in expected and isinstance(value, float) and value.is_integer():
            values[name] = int(value)
        if "bool" in expected and not isinstance(value, bool):
            raise ConfigError(f"{name}: {value!r} is not allowed; true or false")
        if ("int" in expected or "float" in expected) and value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{name}: {value!r} is not allowed; a number")
    return JobConfig(**values).validate()
