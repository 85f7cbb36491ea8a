"""Training and evaluating DualVGR: run.py (a stage run, train.py) and validation.py (a checkpoint
on a split, validate.py) on top of engine.py (a batch's loss, an epoch, an evaluation pass); the
other modules are their parts (checkpoints and the networks, metrics, plots, provenance, the run
folder, the memory plan).
"""
