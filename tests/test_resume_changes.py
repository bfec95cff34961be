"""A resume continues the checkpoint's optimizer, schedule and data (issue 48, item 3): a changed learning rate,
weight decay or training set would be recorded in config.yaml and MLflow but not applied, so it is refused by
name before any step, and the run's checkpoint is left as it was."""
import shutil

from tests.conftest import tiny_config
from tests.helpers import train


def test_a_resume_with_a_changed_lr_or_other_shards_is_refused_by_name(tmp_path, lspet_shards):
    config = tiny_config(tmp_path, lspet_shards, train={"run_name": "r", "checkpoint_every": 2},
                         stop={"max_steps": 2})
    train(tmp_path, config)
    latest = (tmp_path / "runs" / "r" / "checkpoints" / "latest").read_text()

    for override, named in [("train.lr=0.01", "train.lr 0.001 -> 0.01"),
                            ("train.weight_decay=0.1", "train.weight_decay 0.0 -> 0.1")]:
        proc = train(tmp_path, config, override, "stop.max_steps=4", check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert named in proc.stderr and "train.init_from=runs/r" in proc.stderr
    other = tmp_path / "other-shards"
    shutil.copytree(lspet_shards["val"], other)
    proc = train(tmp_path, config, f"data.train_shards={other}", "stop.max_steps=4", check=False)
    assert proc.returncode == 2 and "data.train_shards: other shards than the run's" in proc.stderr

    assert (tmp_path / "runs" / "r" / "checkpoints" / "latest").read_text() == latest  # nothing was written
    proc = train(tmp_path, config, "stop.max_steps=4")  # unchanged: resumes
    assert "resumed at step 2" in proc.stdout

