"""A training run of one stage, top to bottom: start (device, data, teacher, model, resume),
the epoch loop (train, validate, checkpoints, curves), the test figures of best.pt."""

import inspect
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
from torch.nn.parallel import DistributedDataParallel

from model import DualVGR
from model.diagnostics import layer_warning
from vqakd.core import distributed as dist
from vqakd.core.config import Config, config_to_dict, data_file_paths, dump_config, load_config, override_key
from vqakd.core.errors import UserError
from vqakd.core.files import read_json, write_json
from vqakd.data.batches import DataBundle, load_data, with_dropped
from vqakd.training.checkpoint import (build_checkpoint, build_model_for_stage, check_same_model, check_vocab_match,
                                       count_parameters, load_checkpoint, load_state_strict, model_config_for_stage,
                                       model_config_from, model_from_checkpoint, restore_rng_state, save_checkpoint,
                                       seed_everything)
from vqakd.training.engine import configure_backends, evaluate, loss_scale_warnings, train_one_epoch
from vqakd.training.inference_record import inference_record
from vqakd.training.metrics import epoch_line, format_table, metrics_row, write_metrics_csv
from vqakd.training.plots import plot_curves
from vqakd.training.provenance import (changed_inputs, input_fingerprints, input_paths, provenance_for_config,
                                       utc_now)
from vqakd.training.resume import LR_SCHEDULE_KEYS, apply_lr_schedule, resume_changes
from vqakd.training.run_folder import RunFolder, RunLog, stage_guard
from vqakd.training.memory import MemoryPlan, plan_run
from vqakd.training.validation import eval_batch_per_process, evaluate_split, split_loader

CURVES_REFRESH_S = 60.0


# Several processes: DistributedDataParallel with `train.batch_size` as the GLOBAL batch (B/K
# questions each), so K processes follow the one-process recipe: gradients are averaged,
# BatchNorm statistics cover the whole batch and the HSIC term is scaled by K (compute_loss).
# Dropout masks are seeded by (seed, epoch, rank), so --resume stays exact. Only rank 0 writes.

def per_process_batch(batch_size: int, world_size: int) -> int:
    """train.batch_size, the global batch, split over the processes."""
    if batch_size % world_size:
        nearest = batch_size // world_size * world_size or world_size
        raise UserError(f"train.batch_size ({batch_size}) is the global batch and must be divisible by the number of "
                        f"processes ({world_size}); e.g. --set train.batch_size={nearest}")
    return batch_size // world_size


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    dist.convert_batchnorm(model)
    # Every parameter gets a gradient in every stage (tests/test_distributed_train.py), and BatchNorm
    # buffers are the same on every rank: no unused-parameter search, no per-step buffer broadcast
    # (torch >= 2.14 renames broadcast_buffers).
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=False, **no_buffer_sync)


@dataclass
class StageStart:
    """What the epoch loop starts from, loaded and checked before the output folder changes."""

    device: torch.device
    batch_train: int                 # questions per process and step
    bundle: DataBundle
    model: DualVGR
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.StepLR
    teacher: Optional[DualVGR]
    teacher_file: Optional[str]
    inputs: dict                     # content fingerprint of every input file
    notes: list                      # settings taken from the input files
    memory_plan: MemoryPlan          # what the run was predicted to need
    # What resume_from restores (else a new run's start).
    history: list = field(default_factory=list)     # metrics.csv rows so far
    best: dict = field(default_factory=dict)        # {epoch, val_accuracy} of best.pt
    start_epoch: int = 1
    # Every resume of this run (empty: not resumed): {epoch, after_epoch, changed: {key: [old, new]}}.
    resumes: list = field(default_factory=list)


def teacher_checkpoint(config: Config, stage: str, given: Optional[str]) -> Optional[str]:
    """The checkpoint `stage` distils from: `given` (--teacher), else <output_dir>/teacher/best.pt;
    None when the stage does not distil."""
    if config.loss.distill_of(stage) == "none":
        return None
    return given or RunFolder(config.stage_dir("teacher")).best


# Model settings a student takes from its teacher's checkpoint unless set on the command line:
# both read the same features and words (feature distillation compares node features: module_dim).
FROM_TEACHER = ("num_nodes", "vision_dim", "word_dim")
FROM_FEATURE_TEACHER = FROM_TEACHER + ("module_dim",)


def settings_from_files(config: Config, values: Mapping[str, Any], source: str,
                        explicit: Sequence[str]) -> dict[str, str]:
    """Set the model settings an input file (`source`) defines; a conflicting `--set` is refused
    naming both values. Returns {setting: log line} of what was taken."""
    taken = {}
    for key, value in values.items():
        current = getattr(config.model, key)
        if current == value:
            continue
        if f"model.{key}" in explicit:
            raise UserError(f"--set model.{key}={current} conflicts with {source}, which has {key} = {value}; drop "
                            f"the --set (the value is taken from there) or use matching files")
        setattr(config.model, key, value)
        taken[key] = f"model.{key} = {value} from {source} (the config says {current})"
    return taken


def start_stage(config: Config, stage: str, folder: RunFolder, teacher_path: Optional[str], resume: bool,
                overwrite: bool, explicit: Sequence[str] = (), plan_only: bool = False) -> StageStart | MemoryPlan:
    """Every start-up check and load, on every rank, before anything in the output folder changes.
    `plan_only`: stop at the memory plan (returned), before the feature table is read."""
    device = dist.resolve_process_device(config.train.device, what="train.device")
    if config.train.batch_size < 2:
        raise UserError(f"train.batch_size is {config.train.batch_size}: BatchNorm needs at least 2 questions per "
                        "training batch; use 2 or more")
    batch_train = per_process_batch(config.train.batch_size, dist.get_world_size())
    if os.path.exists(folder.last) and not resume and not overwrite and not plan_only:
        raise UserError(f"{folder.folder} already holds a {stage} run ({folder.last}); pass --resume to continue it "
                        "or --overwrite to start again")
    progress = config.train.progress and dist.is_main()
    teacher_file = teacher_checkpoint(config, stage, teacher_path)
    if teacher_file and not os.path.isfile(teacher_file):
        raise UserError(f"teacher checkpoint not found: {teacher_file}; train the teacher first "
                        "(--stage teacher) or pass --teacher <checkpoint>")

    inputs = input_fingerprints(input_paths(config, teacher_file))
    # Read once: its sizes set this run's model settings, then it is the frozen teacher.
    teacher_record = load_checkpoint(teacher_file) if teacher_file else None
    from_teacher = {}
    if teacher_record is not None:
        recorded = teacher_record.get("model_config") or {}
        keys = FROM_FEATURE_TEACHER if config.loss.distill_of(stage) == "feature" else FROM_TEACHER
        from_teacher = settings_from_files(config, {key: recorded[key] for key in keys if key in recorded},
                                           f"the teacher {teacher_file}", explicit)
    expected_by = (f"the teacher {teacher_file} (model)" if {"num_nodes", "vision_dim"} & set(from_teacher)
                   else "model")
    notes = list(from_teacher.values())
    planned = {}

    def plan_memory(bundle: DataBundle) -> bool:
        """Said and checked once the questions are loaded, before the feature table is read."""
        glove = bundle.splits["train"].glove
        if config.data.use_glove and glove is not None:
            notes.extend(settings_from_files(config, {"word_dim": int(glove.shape[1])},
                                             "the GloVe matrix of data.train_questions", explicit).values())
        if teacher_record is not None:      # its sizes are already this run's (settings_from_files)
            check_vocab_match(teacher_record, teacher_file, bundle, "the teacher")
        teacher_config = model_config_from(teacher_record, teacher_file) if teacher_record is not None else None
        planned["plan"] = plan_run(config, bundle, model_config_for_stage(config, stage, bundle), device,
                                   training=True, stage=stage, batch=batch_train,
                                   eval_batch=eval_batch_per_process(config), teacher_config=teacher_config,
                                   refuse=not plan_only)
        return not plan_only

    bundle = load_data(config, device=device, progress=progress, expected_by=expected_by, before_table=plan_memory)
    if plan_only:
        return planned["plan"]
    if len(bundle.splits["train"]) < 2:
        raise UserError(f"{bundle.splits['train'].path}: {len(bundle.splits['train'])} training question(s); "
                        "BatchNorm needs at least 2")
    # The frozen teacher (eval mode, no gradients) runs on every rank, on that rank's own share of the batch.
    teacher = (model_from_checkpoint(teacher_record, teacher_file, device).eval().requires_grad_(False)
               if teacher_file else None)

    seed_everything(config.train.seed)
    model = build_model_for_stage(config, stage, bundle, device, progress)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.train.lr_halve_every,
                                                gamma=config.train.lr_decay)
    start = StageStart(device=device, batch_train=batch_train, bundle=bundle, model=model, optimizer=optimizer,
                       scheduler=scheduler, teacher=teacher, teacher_file=teacher_file, inputs=inputs,
                       notes=notes, memory_plan=planned["plan"])
    if resume and os.path.isfile(folder.last):
        resume_from(folder, start, config, stage)
    return start


def resume_from(folder: RunFolder, start: StageStart, config: Config, stage: str) -> None:
    """Restore the weights, optimizer, scheduler, RNGs and history of last.pt into `start`; settings
    that differ from the run's saved config are refused or applied and recorded (resume.py)."""
    path = folder.last
    checkpoint = load_checkpoint(path)
    check_same_model(checkpoint, path, start.model)
    changed_files = changed_inputs(checkpoint.get("inputs"), start.inputs, input_paths(config, start.teacher_file))
    if changed_files:
        raise UserError(f"cannot resume {path}: {', '.join(changed_files)} changed since epoch {checkpoint.get('epoch')} was "
                        "trained (other content under the same path); restore the file, or --overwrite to start again")
    recorded = checkpoint.get("inputs") or {}
    moved = frozenset(key for key, value in start.inputs.items() if value is not None and recorded.get(key) == value)
    changed = resume_changes(checkpoint.get("config") or {}, config, stage, path, same_content=moved)
    check_vocab_match(checkpoint, path, start.bundle, "the run being resumed")
    load_state_strict(start.model, checkpoint["state_dict"], path)
    try:
        start.optimizer.load_state_dict(checkpoint["optimizer"])
        start.scheduler.load_state_dict(checkpoint["scheduler"])
    except (KeyError, ValueError, TypeError) as exc:
        raise UserError(f"{path}: cannot restore the optimizer/scheduler state ({exc})") from None
    if any(key in changed for key in LR_SCHEDULE_KEYS):
        apply_lr_schedule(start.optimizer, start.scheduler, config.train)
    restore_rng_state(checkpoint["rng"])
    start.history = list(checkpoint.get("history") or [])
    start.best = dict(checkpoint.get("best") or {})
    done = int(checkpoint["epoch"])
    if config.train.epochs < done:
        raise UserError(f"--resume with train.epochs={config.train.epochs}: {path} has already trained {done} "
                        f"epochs; set train.epochs to {done} or more (results of epoch {done} are in "
                        f"{folder.folder})")
    start.start_epoch = done + 1
    # Resumes recorded before, less those whose epochs were never checkpointed (redone now).
    earlier = read_json(folder.resumes) if os.path.isfile(folder.resumes) else []
    if not isinstance(earlier, list) or not all(isinstance(e, dict) and isinstance(e.get("epoch"), int)
                                                for e in earlier):
        raise UserError(f"{folder.resumes}: not a list of resumes ({{epoch, after_epoch, changed}}); "
                        "delete it to continue")
    start.resumes = [entry for entry in earlier if entry["epoch"] < start.start_epoch]
    start.resumes.append({"epoch": start.start_epoch, "after_epoch": done, "changed": changed})


def prepare_folder(folder: RunFolder, start: StageStart, config: Config, stage: str, resume: bool,
                   overwrite: bool, log: RunLog) -> None:
    """Main process, once every rank has passed every check: discard an overwritten run, save the config."""
    if start.resumes:
        log(f"resuming {stage} from {folder.last} after epoch {start.start_epoch - 1}")
        changed = start.resumes[-1]["changed"]
        if changed:
            log(f"settings changed from epoch {start.start_epoch} on: "
                + ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items()))
        write_json(folder.resumes, start.resumes)
    elif resume:
        log(f"no checkpoint at {folder.last}; starting {stage} from epoch 1")
    elif overwrite:
        folder.remove_outputs()
    if not start.resumes and os.path.exists(folder.resumes):
        os.remove(folder.resumes)       # left by a run that is started again
    dropped = {name: split.dropped for name, split in start.bundle.splits.items() if split.dropped}
    if dropped:
        log("data.missing_videos: drop left out " + ", ".join(f"{count} {name}" for name, count in dropped.items())
            + " question(s) whose video is missing from the feature files (val/test: counted as wrong)")
    dump_config(config, folder.config)


def run_training(config: Config, stage: str, teacher_path: Optional[str] = None, resume: bool = False,
                 overwrite: bool = False, config_file: Optional[str] = None,
                 explicit: Sequence[str] = ()) -> dict[str, Any]:
    """Train one stage end to end; returns the results.json content (or {} when stopped early).
    Under torchrun every process calls this. The stage folder is locked for the whole run, and
    no stage file may be one of the run's inputs."""
    folder = RunFolder(config.stage_dir(stage))
    log = RunLog(folder.log)
    inputs = {"--cfg": config_file, "--teacher": teacher_checkpoint(config, stage, teacher_path),
              **data_file_paths(config)}
    with dist.session(), stage_guard(folder, stage, inputs):
        started = utc_now()
        config.stage(stage)
        finished = finished_run(folder, config, stage, log) if resume else None
        if finished is not None:
            return finished
        start = dist.agree(lambda: start_stage(config, stage, folder, teacher_path, resume, overwrite,
                                               explicit))
        device, bundle, model = start.device, start.bundle, start.model
        configure_backends(device, config.train.tf32)
        if dist.is_main():
            prepare_folder(folder, start, config, stage, resume, overwrite, log)
        for note in start.notes:
            log(note)
        log("\n".join(start.memory_plan.lines()))
        dist.barrier()

        processes = (f", DistributedDataParallel: {dist.get_world_size()} processes x {start.batch_train} "
                     f"questions (global batch {config.train.batch_size})" if dist.is_initialized() else "")
        log(f"{stage}: {count_parameters(model):,} parameters (G={model.config.graph_layers}, "
            f"U={model.config.unit_layers}), device {device}{processes}, features on {bundle.table.device} "
            f"({bundle.table.mode}, {bundle.table.dtype_name}), {len(bundle.splits['train'])} train / "
            f"{len(bundle.splits['val'])} val / {len(bundle.splits['test'])} test questions"
            + (f", distill {config.loss.distill_of(stage)} from {start.teacher_file}"
               if start.teacher_file else ""))
        if not train_epochs(config, stage, start, folder, log):
            return {}
        dist.barrier()          # best.pt is complete before any rank reads it
        return evaluate_best(config, stage, start, folder, log, started)


def finished_run(folder: RunFolder, config: Config, stage: str, log: RunLog) -> Optional[dict[str, Any]]:
    """results.json, said in the log, when --resume finds the run complete: every epoch of
    train.epochs trained and the test figures written. Nothing is trained or rewritten then."""
    if not (os.path.isfile(folder.last) and os.path.isfile(folder.results)):
        return None
    epoch = load_checkpoint(folder.last).get("epoch")
    if not isinstance(epoch, int) or epoch != config.train.epochs:
        return None         # more epochs to train, or fewer asked for than done (refused by resume_from)
    try:
        results = read_json(folder.results)
    except UserError:
        return None         # an unreadable results.json: resuming rewrites it
    log(f"{stage} run in {folder.folder} is finished: all {epoch} epochs done and "
        f"{folder.results} written; to train longer, add --set train.epochs=N with N > {epoch}")
    return results


def train_epochs(config: Config, stage: str, start: StageStart, folder: RunFolder, log: RunLog) -> bool:
    """The epoch loop: train, validate, step the scheduler, write checkpoints, metrics.csv and the
    curves. False when stopped early by train.stop_after_epoch."""
    world, main = dist.get_world_size(), dist.is_main()
    device, model, optimizer, scheduler = start.device, start.model, start.optimizer, start.scheduler
    progress = config.train.progress and main
    trained = wrap_ddp(model, device) if dist.is_initialized() else model
    train_loader = split_loader(config, start.bundle, "train", device, start.batch_train, shuffle=True)
    val_loader = split_loader(config, start.bundle, "val", device)
    # What every checkpoint of the run records; inference: what predict.py needs to answer about a
    # new video as this run's data was made.
    run_record = {"vocab": start.bundle.vocab.info(), "config": config_to_dict(config), "inputs": start.inputs,
                  "inference": inference_record(config.data.appearance_feat, config.data.motion_feat,
                                                start.bundle.vocab)}
    history, best, epochs = start.history, start.best, config.train.epochs
    last_plot = time.monotonic()
    warned = {name for earlier in history for name in str(earlier.get("collapsed_layers", "")).split()}
    for epoch in range(start.start_epoch, epochs + 1):
        train_loader.sampler.epoch = epoch
        if world > 1:       # dropout masks of (seed, epoch, rank): --resume needs no per-rank RNG state
            torch.manual_seed(config.train.seed + 1_000_003 * epoch + 7_919 * dist.get_rank())
        lr = optimizer.param_groups[0]["lr"]
        epoch_started = time.perf_counter()
        train_stats = train_one_epoch(trained, train_loader, optimizer, device, epoch, stage=stage,
                                      loss_cfg=config.loss, teacher=start.teacher, grad_clip=config.train.grad_clip,
                                      amp=config.train.amp, log_every=config.train.log_every, progress=progress,
                                      batch_shards=world)
        # The same forward passes give the validation losses and the graph layers' node spread.
        val_summary, _ = evaluate(model, val_loader, device, amp=config.train.amp, progress=progress,
                                  desc=f"val epoch {epoch}", loss_cfg=config.loss, stage=stage,
                                  teacher=start.teacher, reference_batch=config.train.batch_size, node_spread=True)
        # Questions dropped for missing videos count as wrong (same denominator every epoch).
        val_summary = with_dropped(val_summary, start.bundle.splits["val"])
        scheduler.step()
        row = metrics_row(epoch, lr, train_stats, val_summary, time.perf_counter() - epoch_started)
        history.append(row)
        # val_summary is the whole split's (summed over ranks): every rank takes the same decision.
        is_best = not best or val_summary["accuracy"] > best["val_accuracy"]
        if is_best:
            best = {"epoch": epoch, "val_accuracy": val_summary["accuracy"]}
        if main:
            checkpoint = build_checkpoint(model=model, stage=stage, epoch=epoch, optimizer=optimizer,
                                          scheduler=scheduler, metrics=row, history=history, best=best, **run_record)
            # best first: if the job dies between the two writes, last.pt still points to the
            # previous epoch and resuming redoes this one, rewriting both.
            if is_best:
                save_checkpoint(folder.best, checkpoint)
            save_checkpoint(folder.last, checkpoint)
            write_metrics_csv(folder.metrics, history)
            # Drawing takes a second or two: refresh the PNG at most once a minute, and at the end.
            if epoch in (epochs, config.train.stop_after_epoch) or time.monotonic() - last_plot >= CURVES_REFRESH_S:
                plot_curves(history, folder.curves, stage, best["epoch"])
                last_plot = time.monotonic()
        log(epoch_line(row, epochs, is_best))
        if epoch == 1:                      # once per run: a resumed run has passed epoch 1
            for warning in loss_scale_warnings(train_stats, stage, config.loss):
                log(warning)
        for name in row.get("collapsed_layers", "").split():
            if name not in warned:          # once per layer and run
                warned.add(name)
                log(layer_warning(name))
        if config.train.stop_after_epoch == epoch and epoch < epochs:
            log(f"stopped after epoch {epoch} (train.stop_after_epoch); continue with --resume")
            dist.barrier()
            return False
    return True


def evaluate_best(config: Config, stage: str, start: StageStart, folder: RunFolder, log: RunLog,
                  started: str) -> dict[str, Any]:
    """Evaluate best.pt on the test split and write results.json."""
    device = start.device

    def load_best():
        best_checkpoint = load_checkpoint(folder.best)
        return best_checkpoint, model_from_checkpoint(best_checkpoint, folder.best, device)

    best_checkpoint, best_model = dist.agree(load_best, "loading best.pt")
    record, test_summary, _ = evaluate_split(config, start.bundle, "test", best_checkpoint, best_model, device)
    results = {
        "stage": stage,
        **record,
        "val_accuracy": best_checkpoint.get("best", {}).get("val_accuracy"),
        "checkpoint": folder.best,
        "distill": config.loss.distill if stage == "student" else None,
        "teacher": start.teacher_file,
        "inputs": start.inputs,             # content fingerprints: what the study compares on reuse
        "model_config": best_checkpoint["model_config"],
        "config": config_to_dict(config),
        # Settings changed on --resume, from which epoch (config above: the values at the end).
        "resumed": start.resumes,
        "world_size": dist.get_world_size(),
        "memory_plan": start.memory_plan.record(),
    }
    if dist.is_main():
        results["provenance"] = provenance_for_config(config, started=started, device=device,
                                                      world_size=dist.get_world_size())
        write_json(folder.results, results)
    log(format_table(test_summary, f"{stage} test accuracy (best epoch {results['epoch']} by val accuracy):"))
    log(f"wrote {folder.results}, {folder.metrics}, {folder.curves}")
    dist.barrier()
    return results


def train_stage(cfg: str, stage: str, overrides: list[str] = (), *, teacher: Optional[str] = None,
                distill: Optional[str] = None, device: Optional[str] = None, resume: bool = False,
                overwrite: bool = False, original_flags: Optional[dict[str, Any]] = None, plan: bool = False) -> int:
    """What `python train.py` does with its flags: the config (YAML + `--set` + the original
    code's flags), then `run_training`; with `plan`, print the memory plan only (exit status 1
    when the run would not fit)."""
    overrides = list(overrides)
    if distill is not None:
        overrides.insert(0, f"loss.distill={distill}")
    if device is not None:
        overrides.insert(0, f"train.device={device}")
    config = load_config(cfg, overrides, original_flags or {})
    explicit = [override_key(text) for text in overrides]
    if plan:
        folder = RunFolder(config.stage_dir(stage))
        with dist.session():
            memory_plan = dist.agree(lambda: start_stage(config, stage, folder, teacher, resume, overwrite, explicit,
                                                         plan_only=True))
        if dist.is_main():
            print("\n".join(memory_plan.lines()))
        return 0 if memory_plan.fits() else 1
    run_training(config, stage, teacher_path=teacher, resume=resume, overwrite=overwrite, config_file=cfg,
                 explicit=explicit)
    return 0
