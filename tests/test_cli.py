"""The `vpmoe` command end to end: train with recording, record a checkpoint, audit it."""

import json
import shutil

import pytest

from analysis import queries
from analysis.store import Store
from app.cli import main


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    code = main(["train", "--out", str(root / "demo"), "--steps", "3", "--micro-batch-size", "1", "--record",
                 "--threads", "1"])
    assert code == 0
    return root


def test_train_record_writes_a_complete_run_beside_the_checkpoints(recorded_run):
    store = Store(recorded_run)
    runs = queries.runs(store)
    assert list(runs.run_id) == ["demo"] and list(runs.status) == ["complete"]
    assert list(queries.steps(store, "demo").step) == [1, 2, 3]
    assert sorted(queries.expert_load(store, "demo", step=3).layer.unique()) == list(range(2, 9))
    assert (recorded_run / "demo" / "checkpoint-000003" / "checkpoint.json").is_file()
    assert store.manifest("demo")["kernels"] == {"attention": "blocked", "experts": "grouped"}


def test_train_resume_record_continues_the_same_run(recorded_run, tmp_path, capsys):
    root = tmp_path / "runs"
    shutil.copytree(recorded_run, root)
    resume = ["train", "--out", str(root / "demo"), "--steps", "5", "--micro-batch-size", "1", "--record",
              "--threads", "1", "--resume"]
    with Store(root).create_run("busy", {"config": {}}):
        assert main([*resume, "--run-id", "busy"]) == 2
    assert "run busy: its writer" in capsys.readouterr().err
    assert main(resume) == 0
    store = Store(root)
    assert "demo-resumed" not in set(store.runs().run_id) and store.status("demo") == "complete"
    assert list(queries.steps(store, "demo").step) == [1, 2, 3, 4, 5]
    resumes = store.manifest("demo")["resumes"]
    assert [(entry["from_step"], entry["previous_status"]) for entry in resumes] == [(3, "complete")]
    assert resumes[0]["changed"]["config"]["training"]["steps"] == 5
    assert store.manifest("demo")["config"]["training"]["steps"] == 3


def test_record_a_checkpoint_without_training(recorded_run, capsys):
    ckpt = recorded_run / "demo" / "checkpoint-000003"
    assert main(["record", str(ckpt), "--tokens", "256"]) == 0
    assert "recorded 256 tokens" in capsys.readouterr().out
    store = Store(recorded_run)
    assert store.status("demo-eval-000003") == "complete"
    load = queries.expert_load(store, "demo-eval-000003", step=3)
    assert load.groupby("layer").tokens.sum().eq(256 * 4).all()
    assert main(["record", str(recorded_run / "nope")]) == 2
    assert "not a checkpoint" in capsys.readouterr().err


def test_audit_prints_a_verdict_and_writes_reports(recorded_run, capsys):
    ckpt = recorded_run / "demo" / "checkpoint-000003"
    code = main(["audit", str(ckpt), "--tokens", "1024", "--json"])
    assert code in (0, 1, 2)
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] in ("PASS", "WARN", "FAIL") and (ckpt / "audit" / "audit.json").is_file()
    assert main(["audit", str(recorded_run / "missing")]) == 3
