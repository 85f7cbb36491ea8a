"""What `train.py --resume` does with settings that differ from the run being resumed.

The run's last.pt stores the config it ran with. On --resume every setting that differs from it
is either REFUSED (stops with the key and both values) or APPLIED from the first resumed epoch
on and recorded; see RESUME_REFUSED for the list and the reasons.
"""

from __future__ import annotations

import os
from typing import Any

from vqakd.core.config import DATA_FILES, Config, config_from_dict, config_to_dict, flat_settings
from vqakd.core.errors import UserError


# What `train.py --resume` does with a setting that differs from the run being resumed (the
# config saved in its last.pt). REFUSED: the setting defines the run itself (its network, its
# data, its start), so changing it would silently mix two runs; --resume stops and names it.
# Everything else is APPLIED from the first resumed epoch on and recorded (results.json
# `resumed`: [{epoch, after_epoch, changed: {key: [old, new]}}], config.yml shows the current
# values, metrics.csv the lr of every epoch). train.lr / lr_halve_every / lr_decay are applied
# to the optimizer and scheduler as if the new schedule had been used from the start: the lr of
# the resumed epoch is lr * lr_decay ** ((epochs done) // lr_halve_every). Loss weights, grad
# clipping, amp/tf32, train.epochs and stop_after_epoch (a run can be extended), devices,
# workers, batch size of evaluation, logging, the feature table's dtype/mode/device and the
# output names take effect as they are read every epoch.
RESUME_REFUSED = {
    "dataset": "the dataset of the run", **{f"data.{key}": "the run's data" for key in DATA_FILES},
    "data.missing_videos": "which questions the run uses",
    "data.use_glove": "only used when the run starts", "data.glove": "only used when the run starts",
    "train.seed": "the run's random stream and shuffling", "train.batch_size": "the run's recipe",
    "loss.distill": "what the stage trains",
}
RESUME_REFUSED_SECTIONS = {"model": "the network"}     # and the stage's own graph_layers
RESUME_PATH_KEYS = tuple(f"data.{key}" for key in DATA_FILES) + ("output_dir",)
LR_SCHEDULE_KEYS = ("train.lr", "train.lr_halve_every", "train.lr_decay")


def _same_setting(key: str, old: Any, new: Any) -> bool:
    if key in RESUME_PATH_KEYS and isinstance(old, str) and isinstance(new, str):
        return os.path.abspath(old) == os.path.abspath(new)
    return old == new


def resume_changes(saved: dict, config: Config, stage: str, path: str,
                   same_content: frozenset = frozenset()) -> dict[str, list]:
    """{key: [saved value, current value]} of every setting that differs from the saved config
    of the run being resumed (`saved`, from `path`); a refused change (see RESUME_REFUSED) is a
    UserError naming the key and both values. An empty `saved` (no config recorded) compares
    nothing. `same_content`: the data settings whose file has the content the run recorded (a
    dataset moved to another path): their path change is applied and recorded, not refused."""
    if not saved:
        return {}
    old = flat_settings(config_to_dict(config_from_dict(saved, f"{path} (saved config)")))
    new = flat_settings(config_to_dict(config))
    changed = {key: [old.get(key), value] for key, value in new.items()
               if not _same_setting(key, old.get(key), value)}
    refused = []
    for key in changed:
        if key in same_content:
            continue
        section = key.split(".", 1)[0]
        reason = (RESUME_REFUSED.get(key) or RESUME_REFUSED_SECTIONS.get(section)
                  or ("the network" if key == f"{stage}.graph_layers" else None))
        if reason:
            refused.append((key, reason))
    if refused:
        key, reason = refused[0]
        more = f" (and {len(refused) - 1} more: {', '.join(k for k, _ in refused[1:])})" if len(refused) > 1 else ""
        raise UserError(f"{path}: cannot resume with {key} = {changed[key][1]!r}: the run was trained with "
                        f"{changed[key][0]!r} and {key} is fixed for a run ({reason}){more}; use the saved "
                        "value, or --overwrite to start again")
    return changed


def apply_lr_schedule(optimizer, scheduler, train) -> float:
    """Put the config's lr schedule (`train`: the TrainConfig) into a restored optimizer and
    StepLR scheduler as if it had been used from the start; returns the lr of the next epoch."""
    scheduler.step_size = train.lr_halve_every
    scheduler.gamma = train.lr_decay
    scheduler.base_lrs = [train.lr for _ in optimizer.param_groups]
    lr = train.lr * train.lr_decay ** (scheduler.last_epoch // train.lr_halve_every)
    for group in optimizer.param_groups:
        group["initial_lr"] = train.lr
        group["lr"] = lr
    scheduler._last_lr = [lr for _ in optimizer.param_groups]
    return lr
