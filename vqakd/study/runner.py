"""The paper's study: every arm (teacher, students with each distillation) for several seeds.

An arm is a stage of train.py plus `--set` overrides (ARMS below). Each (arm, seed) run trains in
`<study>/seed<S>/<arm>/<stage>/`, a student distilling from its own seed's teacher arm. Runs are
plain train_stage / validate_checkpoint calls in this process, so under `torchrun` every rank makes
the same calls in the same order (decided from files rank 0 wrote before the last barrier); only
rank 0 times inference and writes the report.

A finished run recorded with the same settings is reused, an interrupted one resumed; one recorded
with other settings stops the study with the first difference (`--overwrite` retrains it).
Settings that do not change the numbers (NOT_COMPARED) are not compared.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Optional

from vqakd.core import distributed as dist
from vqakd.core.config import (config_to_dict, data_file_paths, eval_batch_size, flat_settings, load_config,
                               override_key, read_yaml)
from vqakd.core.errors import UserError
from vqakd.core.files import read_json, write_json
from vqakd.core.locks import FolderLock
from vqakd.study.report import EVAL_FILE, PREDS_FILE
from vqakd.training.provenance import changed_inputs, input_fingerprints, input_paths


@dataclass(frozen=True)
class Arm:
    name: str
    stage: str                              # teacher | student
    distill: Optional[str] = None           # students: feature | logit | none
    overrides: tuple[str, ...] = ()         # extra --set key=value of this arm
    teacher: Optional[str] = None           # the arm whose best.pt (same seed) a student distils from
    note: str = ""


ARMS: dict[str, Arm] = {arm.name: arm for arm in (
    Arm("teacher", "teacher", note="DualVGR teacher"),
    Arm("student-none", "student", "none", note="student trained alone (hard loss)"),
    Arm("student-feature", "student", "feature", teacher="teacher", note="feature distillation (the paper)"),
    Arm("student-logit", "student", "logit", teacher="teacher", note="logit distillation (Hinton)"),
    Arm("teacher-gatv2", "teacher", overrides=("model.attention=gatv2",), note="teacher, GATv2 attention"),
    Arm("student-feature-gatv2", "student", "feature", ("model.attention=gatv2",), "teacher-gatv2",
        "feature distillation, GATv2 attention"),
    Arm("teacher-safe", "teacher", overrides=("loss.common=safe",), note="teacher, safe common loss"),
    Arm("student-feature-safe", "student", "feature", ("loss.common=safe",), "teacher-safe",
        "feature distillation, safe common loss"),
)}
DEFAULT_ARMS = ("teacher", "student-none", "student-feature", "student-logit")

# Settings that do not change what a run computes: not compared when deciding to reuse a run.
NOT_COMPARED = ("output_dir", "train.device", "train.progress", "train.log_every", "train.num_workers",
                "train.stop_after_epoch", "train.eval_batch_size", "data.feature_mode", "data.feature_device")
# Set by the study itself, per run.
STUDY_KEYS = ("train.seed", "output_dir")


def parse_seeds(text: str, first_seed: int) -> list[int]:
    """`3` -> three seeds from the config's train.seed (666, 667, 668); `1,2,5` -> those seeds."""
    text = str(text).strip()
    try:
        if "," in text:
            seeds = [int(part) for part in text.split(",") if part.strip()]
        else:
            seeds = list(range(first_seed, first_seed + int(text)))
    except ValueError:
        raise UserError(f"--seeds {text!r}: give a count (3) or a comma-separated list (1,2,3)") from None
    if not seeds or any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r}: need at least one seed, all >= 0 and different")
    return seeds


def parse_arms(text: Optional[str]) -> list[Arm]:
    """The named arms (None: DEFAULT_ARMS) in the order given, each student's teacher arm added before
    it if missing."""
    names = list(DEFAULT_ARMS) if text is None else [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UserError(f"--arms {text!r} names no arm; known arms: {', '.join(ARMS)} (leave --arms out for "
                        f"the default {','.join(DEFAULT_ARMS)})")
    unknown = [name for name in names if name not in ARMS]
    if unknown:
        raise UserError(f"--arms: unknown arm {unknown[0]!r}; known arms: {', '.join(ARMS)}")
    # Each arm after its teacher arm, the first time either is named.
    ordered = dict.fromkeys(each for name in names for each in (ARMS[name].teacher, name) if each)
    return [ARMS[name] for name in ordered]


@dataclass
class Run:
    """One arm trained with one seed."""

    arm: Arm
    seed: int
    output_dir: str
    overrides: list[str]                    # every --set of the train.py call
    config: Any = None                      # the Config the run uses
    teacher_run: Optional["Run"] = None
    action: str = "train"                   # reuse | resume | train | overwrite | skip
    reason: str = ""
    timing: Optional[dict] = None           # time_inference's record, for the report

    @property
    def stage_dir(self) -> str:
        return os.path.join(self.output_dir, self.arm.stage)

    def path(self, name: str) -> str:
        return os.path.join(self.stage_dir, name)

    @property
    def finished(self) -> bool:
        return os.path.isfile(self.path("results.json"))

    def evaluated(self) -> bool:
        """The study's test evaluation of this best.pt exists: written after it, of its test split."""
        best = self.path("best.pt")
        if not all(os.path.isfile(path) and os.path.getmtime(path) >= os.path.getmtime(best)
                   for path in (self.path(PREDS_FILE), self.path(EVAL_FILE))):
            return False
        try:
            record = read_json(self.path(EVAL_FILE))
        except UserError:
            return False
        return (record.get("split") == "test" and isinstance(record.get("checkpoint"), str)
                and os.path.abspath(record["checkpoint"]) == os.path.abspath(best))


def config_difference(recorded: Any, expected: Any) -> Optional[str]:
    """The first compared setting that differs ("key is <recorded> there but <expected> in this study"), or None."""
    old, new = flat_settings(recorded or {}), flat_settings(expected)
    for key in sorted((set(old) | set(new)) - set(NOT_COMPARED)):
        if old.get(key, "<missing>") != new.get(key, "<missing>"):
            return f"{key} is {old.get(key, '<missing>')!r} there but {new.get(key, '<missing>')!r} in this study"
    return None


def plan_study(cfg: str, study_dir: str, seeds: list[int], arms: list[Arm], user_overrides: list[str],
               device: Optional[str] = None, overwrite: bool = False) -> list[Run]:
    """Every run in training order (per seed: the arms as listed) with what to do about it."""
    for text in user_overrides:
        key = override_key(text)
        if key in STUDY_KEYS:
            raise UserError(f"--set {text}: the study sets {key} itself; use --seeds / --out instead")
    shared = ([f"train.device={device}"] if device else []) + list(user_overrides)
    runs: list[Run] = []
    for seed in seeds:
        by_arm: dict[str, Run] = {}
        for arm in arms:
            output_dir = os.path.join(study_dir, f"seed{seed}", arm.name)
            overrides = list(shared) + ([f"loss.distill={arm.distill}"] if arm.distill else []) + list(arm.overrides)
            overrides += [f"train.seed={seed}", f"output_dir={output_dir}"]
            try:
                config = load_config(cfg, overrides)
            except UserError as exc:
                raise UserError(f"arm {arm.name}: {exc}") from None
            run = Run(arm, seed, output_dir, overrides, config, by_arm.get(arm.teacher))
            _decide(run, overwrite)
            by_arm[arm.name] = run
            runs.append(run)
    return runs


def _decide(run: Run, overwrite: bool) -> None:
    expected = config_to_dict(run.config)
    if run.finished:
        results = read_json(run.path("results.json"))
        problem = config_difference(results.get("config"), expected)
        wanted_teacher = run.teacher_run.path("best.pt") if run.teacher_run else None
        # Inputs compared by content: a study folder moved or copied elsewhere stays reusable, and
        # features re-extracted under the same path (or a retrained teacher) are seen.
        paths = input_paths(run.config, wanted_teacher)
        changed = changed_inputs(results.get("inputs"), input_fingerprints(paths), paths)
        if problem is None and changed:
            problem = f"its inputs changed since it was trained: {', '.join(changed)}"
        if problem is None and wanted_teacher and "inputs" not in results and \
                os.path.realpath(str(results.get("teacher"))) != os.path.realpath(wanted_teacher):
            problem = f"it distilled from {results.get('teacher')}, this study uses {wanted_teacher}"
        run.action, run.reason = ("reuse", "finished") if problem is None else ("overwrite", problem)
    elif os.path.isfile(run.path("last.pt")):
        recorded = read_yaml(run.path("config.yml")) if os.path.isfile(run.path("config.yml")) else None
        problem = config_difference(recorded, expected)
        run.action, run.reason = ("resume", "interrupted") if problem is None else ("overwrite", problem)
    else:
        run.action, run.reason = "train", "new"
    if run.action == "overwrite" and not overwrite:
        raise UserError(f"{run.stage_dir} holds a run with other settings ({run.reason}); use another --out, "
                        "delete that folder, or pass --overwrite to retrain it")


def execute(runs: list[Run], cfg: str, log=print) -> list[Run]:
    """Train (or resume) every run that needs it, then evaluate each finished best.pt on the test
    split with predictions. Returns the runs still unfinished (the same list on every rank); an
    error every rank hits reaches study.py's quiet_unless_main, which prints it once."""
    from vqakd.training.run import train_stage
    from vqakd.training.validation import validate_checkpoint

    for run in runs:
        if run.action == "reuse":
            continue
        if run.teacher_run is not None and not run.teacher_run.finished:
            run.action, run.reason = "skip", f"its teacher ({run.teacher_run.stage_dir}) is not finished"
            log(f"study: skipping {run.arm.name} seed {run.seed}: {run.reason}")
            continue
        log(f"study: {run.action} {run.arm.name} seed {run.seed} -> {run.stage_dir}")
        teacher = run.teacher_run.path("best.pt") if run.teacher_run else None
        train_stage(cfg, run.arm.stage, run.overrides, teacher=teacher, resume=run.action == "resume",
                    overwrite=run.action == "overwrite")
        if not run.finished:
            run.action, run.reason = "skip", "stopped before the last epoch (train.stop_after_epoch)"
    for run in runs:
        if run.finished and not run.evaluated():
            # The checkpoint defines the model: validate.py refuses model.* settings.
            overrides = [text for text in run.overrides if not override_key(text).startswith("model.")]
            validate_checkpoint(cfg, run.path("best.pt"), overrides, split="test", write_preds=True,
                                out=run.path(EVAL_FILE), preds_out=run.path(PREDS_FILE))
    return [run for run in runs if not run.finished]


def time_inference(run: Run, passes: int, cache: dict) -> Optional[dict]:
    """Milliseconds per test question of the run's best.pt: the median of `passes` timed passes over
    the test split after a warm-up, cached in `<stage>/timing_test.json` while best.pt and the device stay."""
    import time

    from vqakd.data.batches import load_data, make_loader
    from vqakd.training.checkpoint import load_checkpoint, model_from_checkpoint
    from vqakd.training.engine import evaluate

    if passes <= 0:
        return None
    config = run.config
    device = dist.resolve_device(config.train.device)
    best = run.path("best.pt")
    cache_path = run.path("timing_test.json")
    batch = eval_batch_size(config)
    stamp = {"best_mtime": os.path.getmtime(best), "device": str(device), "batch_size": batch, "passes": passes}
    if os.path.isfile(cache_path):
        cached = read_json(cache_path)
        if all(cached.get(key) == value for key, value in stamp.items()):
            return cached
    checkpoint = load_checkpoint(best)
    config.model.num_nodes = checkpoint["model_config"]["num_nodes"]
    config.model.vision_dim = checkpoint["model_config"]["vision_dim"]
    key = (config.data.vocab, config.data.test_questions, config.data.appearance_feat, config.data.motion_feat,
           str(device))
    if key not in cache:
        cache.clear()           # one feature table in memory at a time
        cache[key] = load_data(config, splits=("test",), device=device, progress=False)
    bundle = cache[key]
    model = model_from_checkpoint(checkpoint, best, device)
    loader = make_loader(bundle.splits["test"], bundle.table, batch, False, config.train.seed, 0,
                         device.type == "cuda", reuse_buffers=True)
    seconds = []
    # A pass ends reading its counts back (synchronised); pass 0 is the warm-up, not timed.
    for index in range(passes + 1):
        started = time.perf_counter()
        evaluate(model, loader, device, amp=config.train.amp)
        if index:
            seconds.append(time.perf_counter() - started)
    questions = max(len(bundle.splits["test"]), 1)
    seconds.sort()
    result = dict(stamp, questions=questions, seconds=seconds,
                  ms_per_question=1000.0 * seconds[len(seconds) // 2] / questions)
    write_json(cache_path, result)
    return result


def run_study(cfg: str, seeds_text: str = "3", arms_text: Optional[str] = None, out: Optional[str] = None,
              device: Optional[str] = None, overrides: Optional[list[str]] = None, overwrite: bool = False,
              timing_passes: int = 3, examples: int = 8) -> int:
    """The whole study: plan, train, evaluate, then (rank 0) time and write `<study>/report/`."""
    overrides = list(overrides or [])
    base = load_config(cfg, ([f"train.device={device}"] if device else []) + overrides)
    study_dir = out or os.path.join(base.output_dir, "study")
    if os.path.exists(study_dir) and not os.path.isdir(study_dir):
        raise UserError(f"--out {study_dir} is a file; the study writes a folder of runs and a report")
    inputs = {"--cfg": cfg, **data_file_paths(base)}
    inside = [f"{label} {path}" for label, path in inputs.items()
              if path and os.path.abspath(path).startswith(os.path.abspath(study_dir) + os.sep)]
    if inside:
        # --overwrite and a changed run replace what is in the study folder: never an input.
        raise UserError(f"--out {study_dir} holds an input of the study ({inside[0]}); choose another study folder")
    if examples < 0:
        raise UserError(f"--examples {examples}: must be 0 or more")
    seeds = parse_seeds(seeds_text, base.train.seed)
    runs = plan_study(cfg, study_dir, seeds, parse_arms(arms_text), overrides, device, overwrite)
    main = dist.env_int("RANK") == 0
    log = print if main else (lambda message: None)
    log("study plan:")
    for run in runs:
        teacher = f" (teacher {run.teacher_run.arm.name}, seed {run.seed})" if run.teacher_run else ""
        log(f"  seed {run.seed:<6} {run.arm.name:<24} {run.action:<9} {run.stage_dir}{teacher}")
    # Two studies writing into one folder would overwrite each other's runs; rank 0 holds the lock.
    with FolderLock(study_dir, "study folder") if main else contextlib.nullcontext():
        # One process group for every train/validate call (their own sessions keep it): under
        # torchrun a second init_process_group in one process cannot connect.
        with dist.session():
            unfinished = execute(runs, cfg, log)
        if not main:
            return 0
        for run in unfinished:
            log(f"study: not finished: {run.arm.name} seed {run.seed} ({run.reason or 'stopped early'})")
        if unfinished:
            log("study: run the same command again to continue; the report is written when every run is finished")
            return 0
        from vqakd.study.report import write_report

        cache: dict = {}
        for run in runs:
            run.timing = time_inference(run, timing_passes, cache)
        cache.clear()
        report_dir = os.path.join(study_dir, "report")
        write_report(runs, report_dir, dataset=base.dataset, examples=examples)
        log(f"study: wrote {os.path.join(report_dir, 'report.md')} and report.json")
        return 0
