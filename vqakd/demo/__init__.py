"""The synthetic demo (`make demo`, `python -m vqakd.demo`): moving coloured shapes with
MSVD-QA-style questions, run through the real commands a user types. scenes.py draws the videos,
data.py writes the dataset, steps.py runs (or skips) a step, pipeline.py holds the demo's steps
and table.py renders its results table."""
