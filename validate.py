"""Evaluate a checkpoint (ours or one of the original DualVGR/VQAKD code) on a split.

    python validate.py --cfg configs/msvd_qa.yml --checkpoint results/msvd-qa/default/student/best.pt \
        [--split test|val|train] [--write-preds] [--out eval.json]

Prints overall and per-question-type accuracy with counts and writes them as JSON (default
`<checkpoint folder>/eval_<split>.json`); `--write-preds` adds a CSV with one row per question.
Under `torchrun --nproc_per_node=K` each process evaluates a share of the split and rank 0
writes the figures of the whole split (every question counted once).
"""

from __future__ import annotations

import argparse

from vqakd.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="YAML config naming the data files")
    parser.add_argument("--checkpoint", required=True, help="a best.pt/last.pt, or an original DualVGR checkpoint")
    parser.add_argument("--split", default="test", choices=("test", "val", "train"))
    parser.add_argument("--write-preds", action="store_true",
                        help="also write one CSV row per question (id, video, question, prediction, answer, correct)")
    parser.add_argument("--out", default=None, help="JSON output (default <checkpoint folder>/eval_<split>.json)")
    parser.add_argument("--preds-out", default=None, help="CSV output of --write-preds (default <out>_preds.csv)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (sets train.device)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set data.test_questions=... (repeatable)")
    return parser


if __name__ == "__main__":
    # --help and flag errors answer before torch is imported (seconds); main() parses again.
    build_parser().parse_args()

import contextlib  # noqa: E402
import csv  # noqa: E402
import io  # noqa: E402
import os  # noqa: E402
from typing import Any, Mapping, Optional  # noqa: E402

from vqakd.errors import interruptible_imports  # noqa: E402

with interruptible_imports():       # torch takes seconds to import: Ctrl-C there is a clean exit too
    import numpy as np  # noqa: E402

    from vqakd import distributed as dist  # noqa: E402
    from vqakd.checkpoint import load_checkpoint, model_config_from, model_from_checkpoint  # noqa: E402
    from vqakd.config import Config, eval_batch_size, load_config  # noqa: E402
    from vqakd.data import DataBundle, load_data, make_loader  # noqa: E402
    from vqakd.device import resolve_process_device  # noqa: E402
    from vqakd.engine import configure_backends, evaluate  # noqa: E402
    from vqakd.errors import UserError  # noqa: E402
    from vqakd.io import atomic_open, ensure_writable_dir, remove_stale_temporaries, write_json  # noqa: E402
    from vqakd.locks import output_lock  # noqa: E402
    from vqakd.metrics import FIRST_ANSWER_LABEL, format_table  # noqa: E402
    from vqakd.models import check_vocab_match, count_parameters  # noqa: E402
    from vqakd.outputs import check_output_paths  # noqa: E402

PREDICTION_COLUMNS = ("question_id", "video_id", "question", "predicted_answer", "answer", "correct")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Under torchrun an error every rank hits is printed once, by rank 0.
    return dist.quiet_unless_main(lambda: _main(args))


def _main(args) -> int:
    overrides = list(args.overrides)
    if args.device is not None:
        overrides.insert(0, f"train.device={args.device}")
    config = load_config(args.cfg, overrides)
    run_validation(config, args.checkpoint, split=args.split, write_preds=args.write_preds, out=args.out,
                   preds_out=args.preds_out, config_file=args.cfg)
    return 0


def run_validation(config: Config, checkpoint_path: str, split: str = "test", write_preds: bool = False,
                   out: Optional[str] = None, preds_out: Optional[str] = None,
                   config_file: Optional[str] = None) -> dict[str, Any]:
    """Evaluate a checkpoint (ours or original) on a split; write JSON (and predictions CSV).
    Under torchrun each process evaluates its share and rank 0 writes the whole split's figures."""
    folder = os.path.dirname(os.path.abspath(checkpoint_path))
    out = out or os.path.join(folder, f"eval_{split}.json")
    preds_out = preds_out or os.path.splitext(out)[0] + "_preds.csv"
    outputs = {"--out": out, "--preds-out": preds_out if write_preds else None}
    inputs = {"--checkpoint": checkpoint_path, "--cfg": config_file,
              **{f"data.{key}": getattr(config.data, key) for key in (
                  "vocab", "train_questions", "val_questions", "test_questions", "appearance_feat", "motion_feat")}}
    check_output_paths(inputs, outputs)         # before any work: never replace the checkpoint
    written = [path for path in outputs.values() if path]

    def take_outputs(locks: contextlib.ExitStack) -> None:
        # Only the main process writes: it locks the files (a second evaluation writing them is
        # refused) and clears the temporary files a killed evaluation left.
        if dist.is_main():
            for path in written:
                ensure_writable_dir(os.path.dirname(os.path.abspath(path)), "output folder for the evaluation results")
                locks.enter_context(output_lock(path, "evaluation output"))
            remove_stale_temporaries(written)

    with dist.session(), contextlib.ExitStack() as locks:
        dist.agree(lambda: take_outputs(locks), "the check of the output files")
        return _run_validation(config, checkpoint_path, split, write_preds, out, preds_out)


def _run_validation(config: Config, checkpoint_path: str, split: str, write_preds: bool, out: str,
                    preds_out: str) -> dict[str, Any]:
    world, rank, main = dist.get_world_size(), dist.get_rank(), dist.is_main()

    def start():
        if split not in ("train", "val", "test"):
            raise UserError(f"unknown split {split!r}; choose train, val or test")
        device = resolve_process_device(config.train.device, what="train.device")
        checkpoint = load_checkpoint(checkpoint_path)
        ensure_writable_dir(os.path.dirname(os.path.abspath(out)), "output folder for the evaluation results")
        model_config = model_config_from(checkpoint, checkpoint_path)
        # The checkpoint defines the network: its clip count and feature size are what the data must match.
        config.model.num_nodes = model_config.num_nodes
        config.model.vision_dim = model_config.vision_dim
        bundle = load_data(config, splits=(split,), device=device, progress=config.train.progress and main,
                           expected_by="the checkpoint's model_config")
        check_vocab_match(checkpoint, checkpoint_path, bundle, "the checkpoint")
        return device, checkpoint, bundle, model_from_checkpoint(checkpoint, checkpoint_path, device)

    device, checkpoint, bundle, model = dist.agree(start)
    configure_backends(device, config.train.tf32)
    loader = make_loader(bundle.splits[split], bundle.table, -(-eval_batch_size(config) // world), False,
                         config.train.seed, config.train.num_workers, device.type == "cuda", rank, world,
                         reuse_buffers=True)
    summary, found = evaluate(model, loader, device, amp=config.train.amp, return_predictions=write_preds,
                              progress=config.train.progress and main, desc=split)
    if write_preds and world > 1:
        shares = dist.all_gather_objects(found)
        found = {key: np.concatenate([share[key] for share in shares]) for key in ("index", "prediction")}
    result = {
        "checkpoint": checkpoint_path,
        "split": split,
        "accuracy": summary["accuracy"],
        "correct": summary["correct"],
        "count": summary["count"],
        "per_type": summary["per_type"],
        "epoch": checkpoint.get("epoch"),
        "stage": checkpoint.get("stage"),
        "original_checkpoint": bool(checkpoint.get("original")),
        "params": count_parameters(model),
    }
    if main:
        print(format_table(summary, f"{checkpoint_path} on {split} ({summary['count']} questions):"))
        write_json(out, result)
        print(f"wrote {out}")
        if write_preds:
            write_predictions(preds_out, bundle, split, found)
            print(f"wrote {preds_out}")
    dist.barrier()
    return result


def write_predictions(path: str, bundle: DataBundle, split: str, found: Mapping[str, np.ndarray]) -> None:
    """One CSV row per question of `split`, in question order (`found`: index and arg-max answer
    of every question, from `evaluate(..., return_predictions=True)`)."""
    data = bundle.splits[split]
    answers = bundle.vocab.idx_to_answer
    order = np.argsort(found["index"], kind="stable")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(PREDICTION_COLUMNS)
    for index, predicted in zip(found["index"][order], found["prediction"][order]):
        label = int(data.answers[index])
        writer.writerow([data.display_id(int(index)), int(data.video_ids[index]), data.text(int(index), bundle.vocab),
                         answers[int(predicted)], answers[label],
                         int(int(predicted) == label and label >= FIRST_ANSWER_LABEL)])
    with atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(buffer.getvalue())


if __name__ == "__main__":
    run_cli(main)
