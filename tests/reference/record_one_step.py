"""Record one training step's losses and gradients in float64 (teacher; student with feature and
logit distillation) and validate.py's predictions on the tiny set of tests/test_train_fixtures.py.

tests/test_numerics_unchanged.py recomputes them with the current code and compares (its
docstring says why float64 and which tolerances). Run from the repository root to re-record,
only when a change is meant to alter the numbers:
    .venv/bin/python tests/reference/record_one_step.py
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import one_step_probe  # noqa: E402


if __name__ == "__main__":
    import tempfile

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        values = one_step_probe.measure(tmp)
    with open(os.path.join(HERE, "one_step.json"), "w") as handle:
        json.dump(values, handle, indent=1, sort_keys=True)
    print("wrote", os.path.join(HERE, "one_step.json"))
