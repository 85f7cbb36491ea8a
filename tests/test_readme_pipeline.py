"""The README's MSVD-QA pipeline, run verbatim on a tiny generated copy of the dataset.

A scratch project folder gets the real layout — `data/msvd-qa/` (annotations, mapping, videos
from the demo generator), `data/glove/glove.840B.300d.txt` (a small GloVe-format file),
`data/weights/` (randomly initialised ResNet-101 and 3D ResNeXt-101 saved in the published
layouts) and the repository's `configs/` — and every `python ...` command of the README's
"The pipeline" section runs there unchanged, in README order. Full-size networks at full image size on
a CPU take minutes, hence `slow` (`make test-all`).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest
import torch

from test_readme import ROOT, readme_commands

pytestmark = pytest.mark.slow


def pipeline_commands() -> list[str]:
    return [command for command in readme_commands("The pipeline") if command.startswith("python ")]


def make_project(folder) -> None:
    import torchvision

    from vqakd.demo import data as demo_data
    from vqakd.extraction.resnext3d import resnext101

    data = folder / "data" / "msvd-qa"
    settings = demo_data.DemoSettings(num_videos=8, seed=3, frame_size=64, fps=10, seconds=2.0).check()
    demo_data.write_dataset(str(data), settings, progress=False)
    (folder / "data" / "glove").mkdir(parents=True)
    os.replace(data / demo_data.GLOVE_FILENAME, folder / "data" / "glove" / "glove.840B.300d.txt")

    weights = folder / "data" / "weights"
    weights.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet101(weights=None).state_dict(), weights / "resnet101-63fe2227.pth")
    state = {f"module.{key}": value for key, value in resnext101().state_dict().items()
             if not key.endswith("num_batches_tracked")}
    torch.save({"epoch": 200, "arch": "resnext-101", "state_dict": state}, weights / "resnext-101-kinetics.pth")
    os.symlink(os.path.join(ROOT, "configs"), folder / "configs")


def test_readme_msvd_pipeline_runs_verbatim(tmp_path):
    commands = pipeline_commands()
    scripts = [shlex.split(command)[1] for command in commands]
    for needed in ("txt2pickle.py", "preprocess/preprocess_questions.py", "preprocess/preprocess_features.py",
                   "train.py", "validate.py"):
        assert needed in scripts, f"the README's MSVD-QA pipeline has no {needed} step"
    make_project(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="2")
    for command in commands:
        words = shlex.split(command)
        argv = [sys.executable, os.path.join(ROOT, words[1]), *words[2:]]
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"

    results = tmp_path / "results" / "msvd-qa" / "default"
    for stage in ("teacher", "student"):
        for name in ("best.pt", "last.pt", "metrics.csv", "results.json"):
            assert (results / stage / name).is_file(), f"{stage}/{name} missing"
    assert (results / "student" / "eval_test.json").is_file()
