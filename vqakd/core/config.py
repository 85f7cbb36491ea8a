"""The typed configuration of `train.py` / `validate.py`: YAML file + command-line overrides.

Every setting is a dataclass field with a named default (docs/method.md); a YAML file only needs
the keys it changes. Loading checks that every key exists (with a "did you mean"), every value has
the declared type, and the values make sense on their own; checks that need the data happen when
it is loaded (`vqakd.data.batches`).

Overrides: `--set section.key=value` (parsed as YAML) and the original DualVGR/VQAKD flags
(ORIGINAL_FLAGS). Precedence: YAML file < original flags < `--set`. Paths may use `{dataset}` and
`{name}`; relative paths are resolved from the current directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from model import ModelConfig
from model.settings import model_config_problems
from vqakd.core.errors import UserError, require_file
from vqakd.core.files import atomic_open, read_text
from vqakd.core.script import ORIGINAL_FLAGS, STAGES

# The DataConfig entries that are a run's input files.
DATA_FILES = ("vocab", "train_questions", "val_questions", "test_questions", "appearance_feat", "motion_feat",
              "glove")


@dataclass
class DataConfig:
    """Input files (docs/method.md#file-formats, listed in DATA_FILES) and how the feature table is held."""

    vocab: str = "data/{dataset}/{dataset}_vocab.json"
    train_questions: str = "data/{dataset}/{dataset}_train_questions.pt"
    val_questions: str = "data/{dataset}/{dataset}_val_questions.pt"
    test_questions: str = "data/{dataset}/{dataset}_test_questions.pt"
    appearance_feat: str = "data/{dataset}/{dataset}_appearance_feat.h5"
    motion_feat: str = "data/{dataset}/{dataset}_motion_feat.h5"
    # Initialise the word embedding with the GloVe matrix stored in the train question file.
    use_glove: bool = True
    # Only used when the train question file carries no GloVe matrix: a GloVe pickle
    # ({word: vector}, from txt2pickle.py) or the GloVe text file, looked up for the vocab words.
    glove: Optional[str] = None
    # float16 halves the memory of the in-memory feature table (MSRVTT-QA appearance: 21 GB -> 10.5 GB);
    # batches are cast back to float32 before the network.
    feature_dtype: Literal["float32", "float16"] = "float32"
    # memory: both HDF5 files read once into one table, batches gathered by index.
    # lazy: for feature files larger than RAM; each loader worker keeps one open handle per file.
    feature_mode: Literal["memory", "lazy"] = "memory"
    # Where the in-memory table lives: auto = on the training GPU when it fits there, else CPU.
    feature_device: Literal["auto", "cpu", "cuda"] = "auto"
    # A question whose video is missing from a feature file (e.g. its extraction failed under
    # --allow-failures): error = stop before training; drop = leave the question out (counted
    # per split in the log and results.json; dropped val/test questions count as wrong).
    missing_videos: Literal["error", "drop"] = "error"


# The `model:` section is model.ModelConfig's own fields, types and defaults, so a new network
# setting is a config key without further code; less these: the vocabulary sizes come from the
# data, the graph layers from the stage (`teacher.graph_layers`, `student.graph_layers`).
NOT_IN_MODEL_SECTION = ("question_vocab_size", "answer_vocab_size", "graph_layers")
_MODEL_HINTS = typing.get_type_hints(ModelConfig)
ModelSection = dataclasses.make_dataclass(
    "ModelSection", [(f.name, _MODEL_HINTS[f.name], field(default=f.default)) for f in dataclasses.fields(ModelConfig)
                     if f.name not in NOT_IN_MODEL_SECTION],
    namespace={"__module__": __name__, "__doc__": "Network sizes shared by teacher and student (model.ModelConfig)."})


@dataclass
class StageSection:
    graph_layers: int = 1       # G


@dataclass
class TrainConfig:
    """The paper's training protocol (docs/method.md#training-and-evaluation)."""

    lr: float = 1e-4
    # The GLOBAL batch: under torchrun with K processes each takes batch_size / K questions per
    # step (must divide), so K GPUs follow the one-GPU recipe.
    batch_size: int = 256
    eval_batch_size: Optional[int] = None   # None: same as batch_size
    epochs: int = 25
    lr_halve_every: int = 10                # StepLR step size, stepped once per epoch
    lr_decay: float = 0.5                   # StepLR gamma ("halve")
    grad_clip: float = 12.0                 # max gradient L2 norm
    seed: int = 666
    num_workers: int = 0                    # loader worker processes (useful in lazy mode)
    amp: Literal["none", "bf16"] = "none"   # bf16 autocast on CUDA; the losses always run in float32
    tf32: bool = True                       # TF32 matmuls/convolutions on CUDA (no effect on the CPU)
    device: str = "auto"                    # auto | cpu | cuda | cuda:N
    log_every: int = 50                     # steps between progress-bar updates (the only host syncs)
    progress: bool = True                   # tqdm bars
    # Stop (as if interrupted) after this epoch, leaving last.pt for --resume; for tests and
    # for splitting a run across scheduler time slots. None: run all epochs.
    stop_after_epoch: Optional[int] = None
    # At most this many batches per epoch in training and in each evaluation (val, test): a bounded
    # run at full size (smoke tests, bench/full_size.py). Accuracies then cover those batches only.
    max_steps: Optional[int] = None


@dataclass
class LossConfig:
    """Loss weights (docs/method.md#losses)."""

    alpha: float = 100.0        # common loss weight
    beta: float = 1e-6          # dependence (HSIC) loss weight
    tau_app: float = 1.0        # temperature of the APP distillation term
    tau_mo: float = 1.0         # temperature of the MO distillation term
    kappa_app: float = 1.0      # weight of APP (original flag --kd_alpha)
    kappa_mo: float = 1.0       # weight of MO (original flag --kd_beta)
    # Student stage: feature = the paper (hard + κ_a APP + κ_m MO); logit = Hinton distillation of
    # the answer logits (+ α C + β H); none = the student trained alone (hard loss only).
    distill: Literal["feature", "logit", "none"] = "feature"
    logit_tau: float = 4.0
    logit_mix: float = 0.5      # weight of the KL term; 1 - mix goes to cross-entropy
    # Common loss: original = the paper's; safe = node pairs whose centred features are only
    # rounding noise (a collapsed graph layer) count 0 instead of normalised noise (docs/method.md).
    common: Literal["original", "safe"] = "original"

    def distill_of(self, stage: str) -> str:
        """The distillation `stage` trains with: the teacher never distils."""
        return self.distill if stage == "student" else "none"


@dataclass
class Config:
    name: str = "default"
    dataset: Literal["msvd-qa", "msrvtt-qa", "demo"] = "msvd-qa"
    output_dir: Optional[str] = None        # None: results/{dataset}/{name}
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    teacher: StageSection = field(default_factory=lambda: StageSection(graph_layers=4))
    student: StageSection = field(default_factory=lambda: StageSection(graph_layers=1))
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def stage(self, stage: str) -> StageSection:
        if stage not in STAGES:
            raise UserError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
        return getattr(self, stage)

    def stage_dir(self, stage: str) -> str:
        return os.path.join(self.output_dir, stage)


# ---------------------------------------------------------------------------- typed conversion

_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(choice) for choice in typing.get_args(tp))
    if origin is typing.Union:      # Optional[X], as in _convert_scalar
        return _type_name(next(arg for arg in typing.get_args(tp) if arg is not type(None))) + " or null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _convert_scalar(value: Any, tp: Any) -> Any:
    """`value` as type `tp` (str, bool, int, float, a Literal or an Optional of one), or raise TypeError."""
    if typing.get_origin(tp) is typing.Union:           # Optional[X], the only union in the schema
        if value is None:
            return None
        tp = next(arg for arg in typing.get_args(tp) if arg is not type(None))
    if typing.get_origin(tp) is Literal:
        ok = isinstance(value, str) and value in typing.get_args(tp)
    elif tp is float and isinstance(value, str):
        # YAML 1.1 (PyYAML) reads `1e-4` (no dot) as a string; accept numeric text for numbers.
        ok = bool(_FLOAT_TEXT.match(value.strip()))
    elif tp in (int, float):
        ok = isinstance(value, (int, tp)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise TypeError
    return float(value) if tp is float else value


def _suggest(key: str, choices: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {prefix + close[0]!r}?)"
    return f" (known keys{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(choices)})"


def _build(cls: type, raw: Any, prefix: str, origins: dict[str, str], default_source: str) -> Any:
    """Build dataclass `cls` from the mapping `raw`, checking keys and types."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        source, where = origins.get(prefix.rstrip("."), default_source), prefix.rstrip(".") or "the top level"
        raise UserError(f"{source}: {where} must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        source = origins.get(full, default_source)
        if key not in hints:
            raise UserError(f"{source}: unknown key {full!r}{_suggest(str(key), list(hints), prefix)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            values[key] = _build(tp, value, f"{full}.", origins, default_source)
            continue
        if isinstance(value, dict):
            raise UserError(f"{source}: {full!r} is a setting, not a section")
        try:
            values[key] = _convert_scalar(value, tp)
        except TypeError:
            raise UserError(f"{source}: key {full!r} must be {_type_name(tp)}, got {value!r}") from None
        if isinstance(values[key], float) and not math.isfinite(values[key]):
            raise UserError(f"{source}: key {full!r} must be a finite number, got {value!r}")
    # Sections the file left out keep their dataclass defaults (e.g. teacher G = 4).
    return cls(**values)


def data_file_paths(config: "Config") -> dict[str, Optional[str]]:
    """{`data.<key>`: path} of the config's input files (DATA_FILES), as messages name them."""
    return {f"data.{key}": getattr(config.data, key) for key in DATA_FILES}


def override_key(text: str) -> str:
    """The dotted key of a `--set key=value` text (`train.lr` of `train.lr=2e-4`)."""
    return text.split("=", 1)[0].strip()


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], YAML-parsed value)."""
    source = f"--set {text}"
    if "=" not in text:
        raise UserError(f"{source}: expected key=value, e.g. --set train.lr=2e-4")
    key, value_text = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise UserError(f"{source}: {key!r} is not a dotted key such as train.lr")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        value = value_text
    nested: dict = {}
    _set_nested(nested, path, value, source)
    _build(Config, nested, "", {}, source)      # an unknown key or a wrong type, named as the user wrote it
    return path, value


def _set_nested(raw: dict, path: list[str], value: Any, source: str) -> None:
    node = raw
    for key in path[:-1]:
        child = {} if node.get(key) is None else node[key]
        if not isinstance(child, dict):
            raise UserError(f"{source}: cannot set {'.'.join(path)} inside the non-mapping value {child!r}")
        # A copy: YAML aliases (`student: *g`) make sections share one dict, which the other must not see.
        node[key] = node = dict(child)
    node[path[-1]] = value


def read_yaml(path: str) -> dict:
    require_file(path, "config file")
    try:
        raw = yaml.safe_load(read_text(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}: invalid YAML{at}: {problem}") from None
    if not isinstance(raw, (dict, type(None))):
        raise UserError(f"{path}: expected a mapping of sections (name, dataset, data, model, train, loss, ...)")
    return raw or {}


def load_config(path: str | None = None, overrides: list[str] | None = None,
                flags: dict[str, Any] | None = None) -> Config:
    """Read `path` (or the defaults), apply original `flags` ({flag: value}, None = not given),
    then `--set` `overrides`; check types and values; fill in the `{dataset}` path templates."""
    raw = read_yaml(path) if path else {}
    default_source = path or "config"
    origins: dict[str, str] = {}
    settings = [(ORIGINAL_FLAGS[flag].split("."), value, f"--{flag}") for flag, value in (flags or {}).items()
                if value is not None]
    settings += [(*parse_override(text), f"--set {text}") for text in overrides or []]
    for key_path, value, source in settings:
        _set_nested(raw, key_path, value, source)
        origins[".".join(key_path)] = source
    config = _build(Config, raw, "", origins, default_source)
    resolve_paths(config)
    check_values(config, default_source, origins)
    return config


def resolve_paths(config: Config) -> None:
    """Fill `{dataset}` / `{name}` templates and the default output folder, in place."""
    names = {"dataset": config.dataset, "name": config.name}

    def fill(value: str) -> str:
        try:
            return value.format(**names)
        except (KeyError, IndexError, ValueError) as exc:
            raise UserError(f"path {value!r}: unknown placeholder {exc} (only {{dataset}} and {{name}} exist)") \
                from None

    for name in DATA_FILES:
        if getattr(config.data, name) is not None:
            setattr(config.data, name, fill(getattr(config.data, name)))
    config.output_dir = fill(config.output_dir) if config.output_dir else os.path.join(
        "results", config.dataset, config.name)


# numpy's and Python's random seeds must fit in 32 bits.
MAX_SEED = 2**32 - 1


def check_values(config: Config, source: str, origins: dict[str, str]) -> None:
    """Value ranges that do not need the data. A problem is blamed on the option that set the
    key (`origins`: key -> "--set ..." or "--flag"), else on `source` (the YAML file)."""
    problems = list(model_config_problems(config.model, "model."))     # each starts with its key
    train_positive = ("lr", "batch_size", "eval_batch_size", "epochs", "lr_halve_every", "lr_decay",
                      "grad_clip", "log_every", "stop_after_epoch", "max_steps")
    positive = ([f"{stage}.graph_layers" for stage in STAGES] + [f"train.{name}" for name in train_positive]
                + ["loss.tau_app", "loss.tau_mo", "loss.logit_tau"])
    for key in positive:
        value = operator.attrgetter(key)(config)
        if value is not None and not value > 0:
            problems.append(f"{key} must be > 0, got {value}")
    for key in ("loss.alpha", "loss.beta", "loss.kappa_app", "loss.kappa_mo", "train.num_workers"):
        value = operator.attrgetter(key)(config)
        if value < 0:
            problems.append(f"{key} must be >= 0, got {value}")
    train = config.train
    if not 0.0 <= config.loss.logit_mix <= 1.0:
        problems.append(f"loss.logit_mix must be in [0, 1], got {config.loss.logit_mix}")
    if not 0 <= train.seed <= MAX_SEED:
        problems.append(f"train.seed must be in [0, {MAX_SEED}] (2**32 - 1), got {train.seed}")
    if train.stop_after_epoch is not None and train.stop_after_epoch > train.epochs:
        problems.append(f"train.stop_after_epoch ({train.stop_after_epoch}) is after the last epoch "
                        f"({train.epochs})")
    if not config.name or "/" in config.name or config.name in (".", ".."):
        problems.append(f"name must be a plain folder name, got {config.name!r}")
    if problems:
        blamed = origins.get(problems[0].split(" ", 1)[0], source)
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"{blamed}: {problems[0]}{more}")


# ---------------------------------------------------------------------------- output

def config_to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def flat_settings(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as {"train.lr": value, ...} (what resumes and studies compare)."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flat_settings(value, f"{prefix}{key}."))
    return flat


def config_from_dict(raw: dict[str, Any], source: str = "checkpoint config") -> Config:
    """Rebuild a Config saved with `config_to_dict` (e.g. from a checkpoint), with the same checks."""
    config = _build(Config, raw, "", {}, source)
    resolve_paths(config)
    return config


def dump_config(config: Config, path: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config_to_dict(config), handle, sort_keys=False, default_flow_style=False)


def eval_batch_size(config: Config) -> int:
    return config.train.eval_batch_size or config.train.batch_size
