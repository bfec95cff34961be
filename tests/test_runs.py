"""The read side of MLflow (pipeline/runs.py): `mshg runs` on the tracked run of a real server, without a
store; `mark_failed` marking exactly its own run; propose-stop's curves and `--compare` on a local store."""
import pytest

from pipeline.cli import main as mshg
from tests.helpers import mlflow_client, mlflow_store, run_python

WARNING = "UserWarning: MLflow "  # the tracker's one warning (MLflow's own logger may add lines)


def test_mshg_runs_prints_the_run_with_params_and_final_metric(tracked_run, capsys):
    client, run, _, _ = tracked_run
    assert mshg(["runs", "--tracking-uri", client.tracking_uri]) == 0
    out = capsys.readouterr().out
    header, row = out.splitlines()[0], next(line for line in out.splitlines() if line.startswith("tracked-run"))
    for column in ["run", "status", "dataset", "config", "zero", "ranks", "steps", "stop", "loss", "final", "commit"]:
        assert column in header.split()
    assert "FINISHED" in row and "lspet" in row and "max_steps" in row
    assert f"pck {100 * run.data.metrics['final/pck']:.1f}" in row
    assert run.data.tags["git_commit"][:8] in row
    assert "mlflow" not in row  # the UI hint is a separate line
    assert client.tracking_uri in out


def test_mark_failed_marks_only_its_own_run_by_id(tmp_path):
    """Issue 48: after a rank died, `mshg train --ranks N` marked every RUNNING run of the name FAILED (on a
    shared server another user's too), and a quote in the name broke the filter. Now the run is found by the
    id its tracker wrote into the run folder at the start; a run of the same name that is not it stays."""
    code = """if True:
        import os
        from pathlib import Path
        from mlflow.tracking import MlflowClient
        from pipeline.runs import mark_failed
        from pipeline.track import Tracker
        name = "it's mine"
        folder = Path("runs") / name
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text("name: x\\n")
        ours = Tracker(True, run_name=name, system_metrics=False)  # rank 0 of the run that will fail
        ours.log_run_inputs([], {}, folder / "config.yaml", {})
        client = MlflowClient()
        other = client.create_run(ours.experiment_id, run_name=name).info.run_id  # another user's, running
        print("RUNS", ours.run_id, other, mark_failed(folder, "a rank exited with code 1"), flush=True)
        os._exit(0)  # rank 0 was ended by the launcher: no finish()
    """
    mlflow_store(tmp_path)  # migrated once a session
    out = run_python(tmp_path, code)
    assert out.returncode == 0 and "RUNS " in out.stdout, out.stderr[-3000:]
    ours, other, marked = out.stdout.split("RUNS ")[1].split()
    assert marked == "True" and WARNING not in out.stderr, out.stderr[-3000:]
    client = mlflow_client(tmp_path)
    run = client.get_run(ours)
    assert run.info.status == "FAILED" and run.data.tags["error"] == "a rank exited with code 1"
    assert client.get_run(other).info.status == "RUNNING"
    # a run folder with no id (the tracker never started) marks nothing
    from pipeline.runs import mark_failed
    assert mark_failed(tmp_path / "runs" / "nothing", "x") is False


def test_mshg_runs_without_a_store_says_so_and_creates_nothing(tmp_path, capsys):
    db = tmp_path / "nothing.db"
    assert mshg(["runs", "--tracking-uri", f"sqlite:///{db}"]) == 1
    assert "no MLflow store at" in capsys.readouterr().out and not db.exists()


def test_propose_stop_reads_the_validation_curve_by_the_metrics_tracked_names(tmp_path):
    """`mshg propose-stop` finds a run's validation metric among the metric classes' names (pipeline.metrics:
    track.py kept its own list before), whichever the run's dataset had; `--compare` puts the runs side by side."""
    from pipeline.runs import compare_runs, run_curves

    uri = mlflow_store(tmp_path)  # migrated once a session
    client = mlflow_client(uri)
    experiment = client.create_experiment("mshg")
    for name, metric in (("lsp", "pck"), ("crowd", "coco/AP"), ("untested", None)):
        run_id = client.create_run(experiment, run_name=name).info.run_id
        client.log_param(run_id, "train.lr", {"lsp": "0.001", "crowd": "0.002", "untested": "0.001"}[name])
        for step in (1, 2, 3, 4):
            client.log_metric(run_id, "loss/smoothed", 1.0 / step, step=step)
            if metric and step % 2 == 0:
                client.log_metric(run_id, metric, step / 8, step=step)
    curves, metric = run_curves("crowd", "mshg", uri, ("loss/smoothed",))
    assert metric == "coco/AP" and curves["coco/AP"] == ([2, 4], [0.25, 0.5])
    assert curves["loss/smoothed"] == ([1, 2, 3, 4], [1.0, 0.5, 1 / 3, 0.25])
    assert run_curves("lsp", "mshg", uri, ())[1] == "pck"
    with pytest.raises(ValueError, match="run untested has no validation metric"):
        run_curves("untested", "mshg", uri, ())
    table = compare_runs(["lsp", "crowd"], "mshg", uri)
    assert table.startswith("1 of 1 config values differ") and "train.lr" in table and "0.002" in table
