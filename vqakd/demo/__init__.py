"""The synthetic demo (`make demo`, `python -m vqakd.demo`): moving coloured shapes with
MSVD-QA-style questions, run through the real commands a user types.

  scenes.py    the shapes, their motion and the rendered frames
  data.py      the generated dataset: videos, annotations, GloVe words, baselines
  steps.py     the demo's steps and their state file
  pipeline.py  the steps in order, and the summary
  table.py     the README's demo table, rendered from the summary
"""
