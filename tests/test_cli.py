"""The `vpmoe` command end to end: train with recording, record a checkpoint, audit it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import queries
from analysis.store import Store
from app.cli import main
from tests.conftest import ROOT


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


def test_train_record_under_torchrun_sums_every_ranks_statistics(tmp_path):
    """Two ranks with one row each record what one process with both rows records (DDP splits the rows)."""
    one = ["train", "--out", str(tmp_path / "one" / "run"), "--steps", "2", "--record", "--threads", "1"]
    assert main([*one, "--micro-batch-size", "2"]) == 0
    torchrun = Path(sys.executable).parent / "torchrun"
    vpmoe = Path(sys.executable).parent / "vpmoe"
    two = [str(torchrun), "--standalone", "--nproc-per-node", "2", str(vpmoe), "train", "--out",
           str(tmp_path / "two" / "run"), "--steps", "2", "--record", "--micro-batch-size", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with Store(tmp_path / "two").create_run("busy", {"config": {}}):  # rank 0 cannot record into a live run
        refused = subprocess.run([*two, "--run-id", "busy"], env=env, capture_output=True, text=True, timeout=300,
                                 cwd=ROOT)
    assert refused.returncode != 0 and "run 'busy' already exists" in refused.stderr
    assert "rank 0 could not start recording" in refused.stderr, "the other rank stops too instead of waiting"
    proc = subprocess.run(two, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    alone, ranks = Store(tmp_path / "one"), Store(tmp_path / "two")
    assert list(queries.runs(ranks).status) == ["complete", "complete"]
    assert ranks.manifest("run")["data"]["data_parallel_ranks"] == 2
    for step in (1, 2):
        expected = queries.expert_load(alone, "run", step=step)
        got = queries.expert_load(ranks, "run", step=step)
        assert got.tokens.tolist() == expected.tokens.tolist(), f"step {step}: loads of both ranks, summed"
        pd.testing.assert_frame_equal(queries.expert_bias(ranks, "run", step=step),
                                      queries.expert_bias(alone, "run", step=step))
    stats = ["bias_override_rate", "aux_map_disagreement", "aux_loss"]
    np.testing.assert_allclose(queries.layer_stats(ranks, "run")[stats].to_numpy(dtype=float),
                               queries.layer_stats(alone, "run")[stats].to_numpy(dtype=float), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(queries.steps(ranks, "run").lm_loss, queries.steps(alone, "run").lm_loss, rtol=1e-5)


def test_train_record_refuses_a_compiled_config(tmp_path, capsys):
    config = tmp_path / "compiled.toml"
    config.write_text((ROOT / "configs" / "tiny.toml").read_text().replace("compile = false", "compile = true"))
    assert "compile = true" in config.read_text()
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--record"]) == 2
    assert "--record needs [runtime].compile = false" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


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
