"""CPU thread defaults (vqakd/core/script.py): applied by every entry script that runs torch before
torch is imported, and never over a setting the user made."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vqakd.core.errors import UserError
from vqakd.core.script import apply_thread_defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIABLES = ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "VQAKD_THREADS")

# Runs a script as __main__ and stops it at its first `import torch`, printing the thread
# variables as they were at that moment (or that torch was never imported).
PROBE = r"""
import json, os, runpy, sys
VARIABLES = %r
class StopAtTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print(json.dumps({v: os.environ.get(v) for v in VARIABLES}), flush=True)
            os._exit(0)
        return None
sys.meta_path.insert(0, StopAtTorch())
sys.argv = json.loads(sys.argv[1])
runpy.run_path(sys.argv[0], run_name="__main__")
print(json.dumps({"torch": "never imported"}))
""" % (VARIABLES,)


ARGUMENTS = {"train.py": ["--cfg", "no-such-config.yml", "--stage", "teacher"],
             "validate.py": ["--cfg", "no-such-config.yml", "--checkpoint", "no-such.pt"],
             "study.py": ["--cfg", "no-such-config.yml"],
             "predict.py": ["--checkpoint", "no-such.pt", "--video", "no-such.mp4", "--question", "what?"],
             "preprocess/preprocess_features.py": ["--dataset", "msvd-qa", "--video-dir", "nowhere",
                                                   "--annotation-dir", "nowhere", "--model", "resnet101"],
             "preprocess/merge_features.py": ["--out", "no-such.h5"]}


def probe(script: str, **env) -> dict:
    environ = {key: value for key, value in os.environ.items() if key not in VARIABLES}
    environ.update(env)
    result = subprocess.run([sys.executable, "-c", PROBE, json.dumps([os.path.join(ROOT, script)] + ARGUMENTS[script])], cwd=ROOT, env=environ,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_defaults_set_only_what_is_unset():
    env = {}
    applied = apply_thread_defaults(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"} == applied

    env = {"OMP_WAIT_POLICY": "active", "OMP_NUM_THREADS": "3", "VQAKD_THREADS": "1"}
    applied = apply_thread_defaults(env)
    assert env["OMP_WAIT_POLICY"] == "active" and env["OMP_NUM_THREADS"] == "3"      # the user's win
    assert applied == {"KMP_BLOCKTIME": "0", "MKL_NUM_THREADS": "1"}


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_bad_thread_count_is_a_user_error(value):
    with pytest.raises(UserError, match="VQAKD_THREADS"):
        apply_thread_defaults({"VQAKD_THREADS": value})


@pytest.mark.parametrize("script", sorted(ARGUMENTS))
def test_scripts_apply_defaults_before_torch(script):
    seen = probe(script)
    assert seen["OMP_WAIT_POLICY"] == "PASSIVE" and seen["KMP_BLOCKTIME"] == "0"
    assert seen["OMP_NUM_THREADS"] is None                # the thread count stays torch's default


def test_scripts_keep_the_users_settings():
    seen = probe("train.py", OMP_WAIT_POLICY="ACTIVE", KMP_BLOCKTIME="200", OMP_NUM_THREADS="2", VQAKD_THREADS="1")
    assert seen == {"OMP_WAIT_POLICY": "ACTIVE", "KMP_BLOCKTIME": "200", "OMP_NUM_THREADS": "2",
                    "MKL_NUM_THREADS": "1", "VQAKD_THREADS": "1"}


def test_bad_variable_ends_the_script_with_one_line():
    environ = {key: value for key, value in os.environ.items() if key not in VARIABLES}
    environ["VQAKD_THREADS"] = "many"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--cfg", "x.yml", "--stage", "teacher"],
                            cwd=ROOT, env=environ, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: VQAKD_THREADS: expected a positive whole number of threads, found 'many'"]
