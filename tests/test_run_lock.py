"""A run folder is held by its run (issue 48, item 2): a second run of the same name fails at once naming the
holder, instead of the two deleting each other's checkpoints and overwriting config.yaml and train.log."""
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline.config import ConfigError
from pipeline.run_folder import LOCK_FILE, RunFolder
from tests.conftest import tiny_config
from tests.helpers import REPO, Training, train


@pytest.mark.quick
def test_a_held_folder_is_refused_naming_the_holder_and_freed_when_the_holder_dies(tmp_path):
    first = RunFolder(tmp_path, "sweep")
    first.lock()
    with pytest.raises(ConfigError, match=rf"sweep: in use by another run \(pid {os.getpid()} on "):
        RunFolder(tmp_path, "sweep").lock()
    with pytest.raises(ConfigError, match="in use by another run"):
        RunFolder(tmp_path, "sweep").check_free()  # what `mshg train --ranks N` asks before the launcher
    RunFolder(tmp_path, "other").lock()  # another name is another folder

    # a holder killed with SIGKILL leaves the file behind, and the kernel frees the lock: a resume takes it
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pipeline.run_folder import RunFolder; "
                               f"folder = RunFolder({str(tmp_path)!r}, 'crashed'); folder.lock(); print('held', flush=True); "
                               "time.sleep(60)"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError, match=f"pid {holder.pid} "):
        RunFolder(tmp_path, "crashed").check_free()
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    assert (tmp_path / "crashed" / LOCK_FILE).is_file()
    RunFolder(tmp_path, "crashed").lock()


def test_a_second_training_of_the_same_name_fails_at_once_and_leaves_the_first_alone(tmp_path, lspet_shards):
    config = tiny_config(tmp_path, lspet_shards, train={"run_name": "twice", "log_every": 1},
                         stop={"max_steps": 100000})
    first = Training(tmp_path, config)
    try:
        first.wait_for(timeout=180)  # step 1: the first run holds its folder
        log = tmp_path / "runs" / "twice" / "train.log"
        t0 = time.monotonic()
        second = train(tmp_path, config, check=False, timeout=120)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert f"in use by another run (pid {first.proc.pid} on " in second.stderr
        assert time.monotonic() - t0 < 60  # before DeepSpeed, DALI and MLflow start work
        assert first.proc.poll() is None  # the first run trains on
        assert "in use" not in log.read_text()
    finally:
        first.kill()
