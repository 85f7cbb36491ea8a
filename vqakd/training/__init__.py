"""Training and evaluating DualVGR: everything a run needs beyond its data.

  run.py              a training run of one stage, top to bottom (what train.py runs)
  validation.py       evaluating a checkpoint on a split (what validate.py runs)
  engine.py           the loss of a batch, one training epoch, one evaluation pass
  builders.py         the model of a stage, the frozen teacher, checks against a checkpoint
  checkpoint.py       saving and loading checkpoints (ours and the original code's), RNG state
  inference_record.py what a checkpoint records of its features and vocabulary for inference
  provenance.py       a run's record: code version, software, config and input digests
  resume.py           which settings a `--resume` may change
  run_folder.py       a stage's folder: outputs, lock, log
  metrics.py          accuracy per question type, loss averages, metrics.csv, epoch lines
  plots.py            the training curves
"""
