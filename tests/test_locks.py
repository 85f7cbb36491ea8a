"""One run per output folder: a second run is refused with the holder's pid; a folder left by a
killed run is taken over. Uses real processes, since that is what the lock is for."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import vqakd.core.locks
from vqakd.core.errors import UserError
from vqakd.core.locks import LOCK_NAME, FolderLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = ("import sys, time\n"
        "from vqakd.core.locks import FolderLock\n"
        "lock = FolderLock(sys.argv[1], 'output folder').acquire()\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n")


@pytest.fixture
def holder(tmp_path):
    """A second process holding the lock on tmp_path/out; killed at the end."""
    folder = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "locked\n"
    yield folder, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_run_is_refused_naming_folder_and_holder(holder):
    folder, proc = holder
    with pytest.raises(UserError) as exc:
        with FolderLock(folder):
            pass
    message = str(exc.value)
    assert "\n" not in message
    assert f"output folder {folder} is in use by another run (pid {proc.pid} on {socket.gethostname()}" in message


SLOW_RECORD = ("import fcntl, os, sys, time\n"
               "from vqakd.core.locks import _write_record\n"
               "os.makedirs(sys.argv[1], exist_ok=True)\n"
               "fd = os.open(os.path.join(sys.argv[1], '.vqakd.lock'), os.O_RDWR | os.O_CREAT, 0o666)\n"
               "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
               "print('locked', flush=True)\n"
               "time.sleep(0.3)\n"
               "_write_record(fd)\n"
               "time.sleep(120)\n")


@pytest.mark.skipif(vqakd.core.locks.fcntl is None, reason="no flock on this platform")
def test_a_run_refused_in_the_moment_the_holder_writes_its_record_still_names_it(tmp_path):
    """Two runs started together: the loser can arrive between the winner's lock and its record."""
    folder = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_RECORD, str(folder)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline() == "locked\n"
        with pytest.raises(UserError, match=f"in use by another run \\(pid {proc.pid} "):
            FolderLock(folder, log=None).acquire()
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_killed_run_is_taken_over(holder):
    folder, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (folder / LOCK_NAME).exists()          # kill -9 leaves the file, but not the flock
    lines = []
    with FolderLock(folder, log=lines.append):
        record = json.loads((folder / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid()
    assert len(lines) == 1 and "taking over the lock" in lines[0] and f"pid {proc.pid}" in lines[0]
    assert not (folder / LOCK_NAME).exists()       # a finished run leaves nothing behind


FORKING_HOLDER = ("import os, sys, time\n"
                  "from vqakd.core.locks import FolderLock\n"
                  "lock = FolderLock(sys.argv[1], 'output folder').acquire()\n"
                  "if os.fork() == 0:\n"          # a loader worker that outlives its run
                  # Printed by the child, after its fork hooks ran: the parent's print could come
                  # first on a loaded machine, and the test would kill the parent too soon.
                  "    print(os.getpid(), flush=True)\n"
                  "    time.sleep(120)\n"
                  "    os._exit(0)\n"
                  "time.sleep(120)\n")


def test_a_forked_child_does_not_keep_a_killed_runs_lock(tmp_path):
    folder = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", FORKING_HOLDER, str(folder)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    child = int(proc.stdout.readline())
    try:
        proc.kill()
        proc.wait()
        with FolderLock(folder, log=None):
            pass
    finally:
        os.kill(child, signal.SIGKILL)


def test_txt2pickle_refuses_a_folder_in_use(holder, tmp_path):
    folder, proc = holder
    glove = tmp_path / "g.txt"
    glove.write_text("a 1 2\n")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "txt2pickle.py"), "--glove", str(glove),
                          "--out", str(folder / "g.pkl"), "--no-progress"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and f"pid {proc.pid}" in run.stderr and str(folder) in run.stderr
    assert not (folder / "g.pkl").exists()


def test_same_process_is_refused_too_and_release_frees_it(tmp_path):
    with FolderLock(tmp_path, log=None):
        with pytest.raises(UserError, match=f"pid {os.getpid()}"):
            FolderLock(tmp_path, log=None).acquire()
    with FolderLock(tmp_path, log=None):
        pass
    assert os.listdir(tmp_path) == []


def test_without_flock_the_record_decides(tmp_path, monkeypatch, holder):
    monkeypatch.setattr(vqakd.core.locks, "fcntl", None)
    lock_file = tmp_path / LOCK_NAME
    base = {"host": socket.gethostname(), "command": "train.py", "started": time.time()}
    # A record of a dead process is stale: taken over.
    lock_file.write_text(json.dumps(dict(base, pid=dead_pid())))
    lines = []
    with FolderLock(tmp_path, log=lines.append):
        pass
    assert lines and "taking over" in lines[0]
    # A record of a live process on this host holds the folder.
    _, proc = holder
    lock_file.write_text(json.dumps(dict(base, pid=proc.pid)))
    with pytest.raises(UserError, match=f"pid {proc.pid}"):
        FolderLock(tmp_path, log=None).acquire()
    # A record from another host (whose pid cannot be checked) holds it, naming the lock file.
    lock_file.write_text(json.dumps(dict(base, host="elsewhere", pid=1, started=0)))
    with pytest.raises(UserError, match=f"pid 1 on elsewhere.*lock file {lock_file}"):
        FolderLock(tmp_path, log=None).acquire()
    # A garbled record is no holder.
    lock_file.write_text("{not json")
    with FolderLock(tmp_path, log=None):
        pass
