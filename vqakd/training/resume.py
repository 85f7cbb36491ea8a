"""What `train.py --resume` does with settings that differ from the config saved in last.pt.

A setting in RESUME_REFUSED defines the run itself (its network, its data, its start): changing it
would silently mix two runs, so --resume stops and names it. Everything else is applied from the
first resumed epoch on and recorded (results.json `resumed`); a changed lr schedule is applied as
if it had been used from the start (`apply_lr_schedule`).
"""

from __future__ import annotations

import os
from typing import Any

from vqakd.core.config import DATA_FILES, Config, config_from_dict, config_to_dict, flat_settings
from vqakd.core.errors import UserError


RESUME_REFUSED = {
    "dataset": "the dataset of the run", **{f"data.{key}": "the run's data" for key in DATA_FILES},
    "data.missing_videos": "which questions the run uses",
    "data.use_glove": "only used when the run starts", "data.glove": "only used when the run starts",
    "train.seed": "the run's random stream and shuffling", "train.batch_size": "the run's recipe",
    "loss.distill": "what the stage trains",
}
# Also refused: the network (model.* and the stage's own graph_layers).
RESUME_PATH_KEYS = tuple(f"data.{key}" for key in DATA_FILES) + ("output_dir",)
LR_SCHEDULE_KEYS = ("train.lr", "train.lr_halve_every", "train.lr_decay")


def _same_setting(key: str, old: Any, new: Any) -> bool:
    if key in RESUME_PATH_KEYS and isinstance(old, str) and isinstance(new, str):
        return os.path.abspath(old) == os.path.abspath(new)
    return old == new


def resume_changes(saved: dict, config: Config, stage: str, path: str,
                   same_content: frozenset = frozenset()) -> dict[str, list]:
    """{key: [saved value, current value]} of every setting that differs from `saved` (the config
    in `path`; empty: nothing to compare); a refused change is a UserError naming the key and both
    values. `same_content`: data settings whose file has the recorded content at another path
    (a moved dataset): applied and recorded, not refused."""
    if not saved:
        return {}
    old = flat_settings(config_to_dict(config_from_dict(saved, f"{path} (saved config)")))
    new = flat_settings(config_to_dict(config))
    changed = {key: [old.get(key), value] for key, value in new.items()
               if not _same_setting(key, old.get(key), value)}
    refused = [(key, RESUME_REFUSED.get(key, "the network")) for key in changed if key not in same_content
               and (key in RESUME_REFUSED or key.startswith("model.") or key == f"{stage}.graph_layers")]
    if refused:
        key, reason = refused[0]
        more = f" (and {len(refused) - 1} more: {', '.join(k for k, _ in refused[1:])})" if len(refused) > 1 else ""
        raise UserError(f"{path}: cannot resume with {key} = {changed[key][1]!r}: the run was trained with "
                        f"{changed[key][0]!r} and {key} is fixed for a run ({reason}){more}; use the saved "
                        "value, or --overwrite to start again")
    return changed


def apply_lr_schedule(optimizer, scheduler, train) -> None:
    """Put the config's lr schedule (`train`: the TrainConfig) into a restored optimizer and StepLR
    scheduler as if it had been used from the start: the next epoch's lr is
    lr * lr_decay ** (epochs done // lr_halve_every)."""
    scheduler.step_size = train.lr_halve_every
    scheduler.gamma = train.lr_decay
    scheduler.base_lrs = [train.lr for _ in optimizer.param_groups]
    lr = train.lr * train.lr_decay ** (scheduler.last_epoch // train.lr_halve_every)
    for group in optimizer.param_groups:
        group["initial_lr"] = train.lr
        group["lr"] = lr
    scheduler._last_lr = [lr for _ in optimizer.param_groups]
