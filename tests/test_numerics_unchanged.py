"""One training step (teacher; student with feature and with logit distillation), run in float64,
gives the losses and gradients recorded in tests/reference/one_step.json, and validate.py the
recorded predictions; the same holds under a second CPU kernel set and thread count.

Why float64 and these tolerances (measured with tests/one_step_probe.py on one machine under
ATEN_CPU_CAPABILITY=default, avx2 and avx512, 1 and 2 threads each): the kernel sets and thread
counts change the order of the reductions, so the step's values differ between them by at most
4.5e-15 (losses, relative) and 5.7e-11 (gradients, relative to the scale below). In float32 the
same reorderings moved gradient sums by 2.5e-5, more than any honest tolerance for "the code did
not change". A change of the computation — another order of a normalisation and an addition,
another epsilon, a term dropped or added — moves them by 1e-4 or more. The tolerances sit between:
LOSS_TOL relative to the loss, GRAD_TOL relative to max(the quantity's own conditioning, the
step's total gradient norm). The conditioning of a gradient's sum is the sum of its absolute
values; of its norm and its elements, its norm. The total gradient norm is the floor for
gradients that are exactly zero in exact arithmetic (the attention score bias, before a softmax),
whose computed values are rounding noise.

A pure re-association of two float additions in the code moves the float64 values by ~1e-16: no
test that passes under every kernel set can see it, since the kernel sets do exactly that.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from one_step_probe import STEP_RUNS, measure

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE = os.path.join(HERE, "reference", "one_step.json")
LOSS_TOL = 1e-11
GRAD_TOL = 1e-8


def step_differences(now: dict, then: dict, run: str) -> list[str]:
    """Every loss or gradient summary of `run` in `now` that differs from `then` by more than
    the tolerances, as 'run name: got vs recorded (scaled difference)'."""
    problems = []
    got, want = now[run], then[run]
    if set(got["losses"]) != set(want["losses"]):
        return [f"{run}: loss parts {sorted(got['losses'])} vs recorded {sorted(want['losses'])}"]
    for name, value in want["losses"].items():
        scaled = abs(got["losses"][name] - value) / max(abs(value), sys.float_info.min)
        if not scaled <= LOSS_TOL:
            problems.append(f"{run} loss {name}: {got['losses'][name]!r} vs {value!r} ({scaled:.3g})")
    if set(got["grads"]) != set(want["grads"]):
        return problems + [f"{run}: parameters {sorted(set(got['grads']) ^ set(want['grads']))} differ"]
    total = math.sqrt(sum(summary["norm"] ** 2 for summary in want["grads"].values() if summary))
    for name, summary in want["grads"].items():
        measured = got["grads"][name]
        if (measured is None) != (summary is None):
            problems.append(f"{run} {name}: gradient {'missing' if measured is None else 'present'}")
            continue
        if summary is None:
            continue
        pairs = [("sum", measured["sum"], summary["sum"], summary["abs_sum"]),
                 ("norm", measured["norm"], summary["norm"], summary["norm"])]
        pairs += [(f"value {i}", a, b, summary["norm"]) for i, (a, b) in enumerate(zip(measured["values"],
                                                                                       summary["values"]))]
        for what, a, b, scale in pairs:
            scaled = abs(a - b) / max(scale, total)
            if not scaled <= GRAD_TOL:
                problems.append(f"{run} {name} {what}: {a!r} vs {b!r} ({scaled:.3g})")
    return problems


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    return measure(str(tmp_path_factory.mktemp("one_step")))


@pytest.fixture(scope="module")
def recorded():
    with open(REFERENCE) as handle:
        return json.load(handle)


@pytest.mark.parametrize("run", STEP_RUNS)
def test_one_step_losses_and_gradients_match_the_recorded_values(measured, recorded, run):
    problems = step_differences(measured, recorded, run)
    assert not problems, "\n".join(problems[:20])


def test_validate_predictions_match_the_recorded_ones(measured, recorded):
    assert measured["validate"] == recorded["validate"]
    # A model answering every question alike would make this comparison weak.
    assert len(set(recorded["validate"]["predicted_answer"])) > 1


def test_step_matches_under_another_kernel_set_and_thread_count(recorded, tmp_path):
    """"Another machine" on every run: the float64 step in a fresh process with the CPU kernels
    of another instruction set (the portable `default` ones, or avx2 where this run already
    uses `default`) and another thread count."""
    here = torch.backends.cpu.get_cpu_capability()
    other = "avx2" if here == "DEFAULT" else "default"
    threads = 2 if torch.get_num_threads() == 1 else 1
    out = tmp_path / "steps.json"
    env = dict(os.environ, ATEN_CPU_CAPABILITY=other, OMP_NUM_THREADS=str(threads))
    subprocess.run([sys.executable, os.path.join(HERE, "one_step_probe.py"), str(out)], env=env, check=True,
                   timeout=300)
    with open(out) as handle:
        now = json.load(handle)
    if now["cpu_capability"] == here:
        pytest.skip(f"this CPU offers no kernel set besides {here}")
    assert now["threads"] == threads
    problems = [problem for run in STEP_RUNS for problem in step_differences(now, recorded, run)]
    assert not problems, f"under {now['cpu_capability']}, {threads} threads:\n" + "\n".join(problems[:20])
