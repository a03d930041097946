"""Expert-load audit: verdicts on synthetic routers against their noise floors, the null models against plain
oracles, thresholds from TOML and flags, the command end to end (reports, table, store row, exit codes) and the
Audit page."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import itertools
import json
import math
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from streamlit.testing.v1 import AppTest
from test_probing import PAGE_DRIVER, ROOT, save_tiny_checkpoint

from analysis import metrics, queries
from analysis.audit import (
    EXIT_CODES,
    AuditError,
    AuditReport,
    Thresholds,
    add_audit_arguments,
    audit_checkpoint,
    audit_counts,
    format_table,
    load_thresholds,
    prob_dithering_bias_reaches,
    prob_starved_under_uniform,
    render_markdown,
    thresholds_from_arguments,
)
from analysis.store import Store
from app.serve import STORE_ENV
from vpmoe.config import VpMoEConfig
from vpmoe.model.transformer import VpMoE
from vpmoe.training.checkpoint import SIDECAR, read_checkpoint, save_checkpoint
from vpmoe.training.data import PackedDataset

E, K, RATE = 256, 4, 1e-3
RUN = "audited-run"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def uniform_counts(tokens: int, layers: int = 4, seed: int = 0) -> np.ndarray:
    """Counts [layers, E] of uniform top-K routing of `tokens` tokens."""
    return metrics.simulate_uniform_routing(tokens, E, K, layers, np.random.default_rng(seed))


def dithering_bias(layers: int, steps: int, seed: int = 1) -> np.ndarray:
    """Biases [layers, E] of balanced experts: sums of `steps` fair +-u moves."""
    moves = np.random.default_rng(seed).choice([-1, 1], size=(steps, layers, E))
    return RATE * moves.sum(axis=0)


def move(counts: np.ndarray, expert: int, change: int) -> np.ndarray:
    """The counts with `expert` changed by `change` tokens and the others evenly the other way (sum kept)."""
    out = counts.copy()
    others = np.array([e for e in range(out.size) if e != expert])
    share, rest = divmod(abs(change), others.size)
    sign = 1 if change > 0 else -1
    out[others] -= sign * share
    out[others[:rest]] -= sign
    out[expert] += change
    return out


def kill(counts: np.ndarray, expert: int) -> np.ndarray:
    """The counts with `expert`'s tokens handed one each to the least-loaded other experts (sum kept)."""
    out = counts.copy()
    taken = int(out[expert])
    out[expert] = 0
    others = [e for e in np.argsort(out, kind="stable") if e != expert][:taken]
    out[others] += 1
    return out


# --- Verdicts on synthetic routers -------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [4096, 262_144])
def test_uniform_routing_passes(tokens: int) -> None:
    report = audit_counts(uniform_counts(tokens), tokens, K, dithering_bias(4, 1000), RATE, 1000, layers=[2, 3, 5, 6])
    assert report.verdict == "PASS", format_table(report)
    assert report.exit_code == 0 and [layer.layer for layer in report.layers] == [2, 3, 5, 6]
    for layer in report.layers:
        assert layer.max_vio <= layer.max_vio_floor and layer.dead == []


@pytest.mark.parametrize("tokens", [64, 4096, 1 << 20])
def test_a_perfectly_balanced_router_passes_at_any_token_count(tokens: int) -> None:
    counts = np.full((3, E), K * tokens // E)
    report = audit_counts(counts, tokens, K, np.zeros((3, E)), RATE, 10)
    assert report.verdict == "PASS", format_table(report)
    assert all(layer.max_vio == 0 and layer.cv == 0 and layer.entropy == pytest.approx(1) for layer in report.layers)


@pytest.mark.parametrize("tokens", [16, 4096, 262_144])
def test_a_collapsed_router_fails(tokens: int) -> None:
    counts = uniform_counts(tokens, layers=2)
    counts[1] = 0
    counts[1, [3, 70, 140, 200]] = tokens  # every token on the same 4 experts
    report = audit_counts(counts, tokens, K, None, RATE, 0, layers=[2, 3])
    assert report.verdict == "FAIL" and report.exit_code == 2
    assert report.rule.startswith("layer 3: MaxVio 63.000 > floor"), report.rule
    assert report.layers[1].entropy == pytest.approx(math.log(4) / math.log(E))


def test_one_dead_expert_fails_when_enough_tokens_were_expected() -> None:
    tokens = 4096
    counts = uniform_counts(tokens, layers=2, seed=3)
    counts[0] = kill(counts[0], 7)
    report = audit_counts(counts, tokens, K, None, RATE, 0)
    assert report.verdict == "FAIL", format_table(report)
    assert report.rule.startswith("layer 1: 1 dead expert(s) (7); uniform routing would leave 2.5e-26 empty")
    assert report.layers[1].verdict == "PASS" and report.layers[0].max_vio <= report.layers[0].max_vio_floor


def test_one_dead_expert_only_warns_when_the_sample_is_too_small_to_tell() -> None:
    tokens = 128
    counts = uniform_counts(tokens, layers=1, seed=4)
    counts[0] = kill(counts[0], 7)
    report = audit_counts(counts, tokens, K, None, RATE, 0)
    assert metrics.expected_dead_under_uniform(tokens, E, K) > 1
    assert report.verdict == "WARN", format_table(report)
    assert "dead expert(s)" in report.rule and report.rule.endswith("too few tokens to tell")
    assert 7 in report.layers[0].dead


def test_a_starved_expert_warns_when_uniform_routing_would_not_starve_one() -> None:
    tokens = 262_144
    counts = uniform_counts(tokens, layers=1, seed=5)
    fair = K * tokens // E
    counts[0] = move(counts[0], 9, fair // 50 - int(counts[0, 9]))
    report = audit_counts(counts, tokens, K, None, RATE, 0)
    assert report.verdict == "WARN" and "1 starved expert(s)" in report.rule, format_table(report)
    assert report.layers[0].starved == [9] and report.layers[0].expected_starved < 1e-100


def test_bias_saturation() -> None:
    tokens, steps = 65_536, 1000
    counts = uniform_counts(tokens, layers=1, seed=6)
    bias = dithering_bias(1, steps)

    def verdict(value: float, at_steps: int = steps) -> AuditReport:
        edited = bias.copy() * at_steps / steps
        edited[0, 11] = value
        return audit_counts(counts, tokens, K, edited, RATE, at_steps)

    at_bound = verdict(-RATE * steps)
    assert at_bound.verdict == "FAIL" and "100% of its bound" in at_bound.rule and "every step" in at_bound.rule
    near = verdict(0.95 * RATE * steps)
    assert near.verdict == "WARN" and "95% of its bound" in near.rule
    assert verdict(0.3 * RATE * steps).verdict == "PASS"
    few_steps = verdict(RATE * 5, at_steps=5)
    assert few_steps.verdict == "WARN" and few_steps.rule.endswith("too few steps to tell")
    beyond = verdict(RATE * (steps + 3))
    assert beyond.verdict == "FAIL" and "exceeds its bound" in beyond.rule


def test_counts_must_add_up_to_k_times_tokens() -> None:
    with pytest.raises(ValueError, match=r"expected K\*T = 4\*100"):
        audit_counts(np.ones((1, E), dtype=int), 100, K, None, RATE, 0)


# --- Null models against plain oracles --------------------------------------------------------------------


def test_starved_probability_against_an_exact_binomial_sum() -> None:
    tokens, experts, topk, fraction = 40, 8, 2, 0.35  # fair share 10, starved below 3.5
    p = Fraction(topk, experts)
    exact = sum(math.comb(tokens, k) * p ** k * (1 - p) ** (tokens - k) for k in range(4))
    assert prob_starved_under_uniform(tokens, experts, topk, fraction) == pytest.approx(float(exact), rel=1e-12)


def test_dithering_probability_against_enumeration() -> None:
    for steps in range(1, 11):
        walks = [abs(sum(moves)) for moves in itertools.product((-1, 1), repeat=steps)]
        for net in range(steps + 1):
            expected = sum(w >= net for w in walks) / len(walks)
            assert prob_dithering_bias_reaches(steps, net) == pytest.approx(expected, rel=1e-12), (steps, net)


# --- Thresholds --------------------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    """Arguments as `vpmoe audit` parses them."""
    parser = argparse.ArgumentParser(prog="vpmoe audit")
    add_audit_arguments(parser)
    return parser.parse_args(argv)


def run(argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `vpmoe audit argv`."""
    args = parse(argv)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = args.func(args)
    return code, out.getvalue(), err.getvalue()


def test_thresholds_come_from_defaults_then_toml_then_flags(tmp_path: Path) -> None:
    toml = tmp_path / "thresholds.toml"
    toml.write_text("max_vio_margin = 0.8\nstarved_fraction = 0.2\n")
    assert load_thresholds(toml) == Thresholds(max_vio_margin=0.8, starved_fraction=0.2)
    args = parse(["ckpt", "--thresholds", str(toml), "--starved-fraction", "0.05", "--max-vio-warn-margin", "0.2"])
    expected = Thresholds(max_vio_margin=0.8, starved_fraction=0.05, max_vio_warn_margin=0.2)
    assert thresholds_from_arguments(args) == expected
    toml.write_text("max_vio_margn = 0.8\n")
    with pytest.raises(AuditError, match=r"thresholds.toml: unknown threshold 'max_vio_margn'"):
        load_thresholds(toml)
    toml.write_text("max_vio_quantile = 1.5\n")
    with pytest.raises(AuditError, match=r"max_vio_quantile must be in \(0, 1\), got 1.5"):
        load_thresholds(toml)
    with pytest.raises(AuditError, match="must be a finite number"):
        Thresholds(null_expected_max="0.01")  # type: ignore[arg-type]
    code, _, err = run([str(tmp_path / "no-checkpoint"), "--thresholds", str(toml)])
    assert code == 3 and "max_vio_quantile" in err


def test_thresholds_change_the_verdict() -> None:
    tokens = 262_144
    fair = K * tokens // E
    counts = uniform_counts(tokens, layers=1, seed=8)
    counts[0] = move(counts[0], 5, int(0.4 * fair))  # MaxVio about 0.4, far above its floor of about 0.05
    assert audit_counts(counts, tokens, K, None, RATE, 0).verdict == "WARN"
    assert audit_counts(counts, tokens, K, None, RATE, 0, Thresholds(max_vio_margin=0.3)).verdict == "FAIL"
    relaxed = Thresholds(max_vio_warn_margin=0.45, max_vio_margin=0.6)
    assert audit_counts(counts, tokens, K, None, RATE, 0, relaxed).verdict == "PASS"
    dead = uniform_counts(4096, layers=1, seed=2)
    dead[0] = kill(dead[0], 3)
    assert audit_counts(dead, 4096, K, None, RATE, 0).verdict == "FAIL"
    strict = audit_counts(dead, 4096, K, None, RATE, 0, Thresholds(null_expected_max=1e-30))
    assert strict.verdict == "WARN" and strict.rule.endswith("too few tokens to tell")


# --- The command ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store folder for this module's runs."""
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def checkpoint(tiny_cfg: VpMoEConfig, store_root: Path) -> Path:
    """A seeded tiny checkpoint at step 40 inside the store run RUN."""
    return save_tiny_checkpoint(tiny_cfg, store_root, RUN, step=40)


@pytest.fixture(scope="module")
def audited(checkpoint: Path) -> tuple[int, str, str]:
    """`vpmoe audit CHECKPOINT --tokens 1024` run once: (exit code, stdout, stderr)."""
    args = parse([str(checkpoint), "--tokens", "1024"])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = args.func(args)
    return code, out.getvalue(), err.getvalue()


def test_the_command_prints_the_table_and_writes_both_reports_and_a_store_row(
        checkpoint: Path, store_root: Path, audited: tuple[int, str, str]) -> None:
    code, out, err = audited
    report = json.loads((checkpoint / "audit" / "audit.json").read_text())
    assert code == EXIT_CODES[report["verdict"]]
    assert "thresholds: MaxVio: WARN > floor + 0.1, FAIL > floor + 0.5" in out
    assert "MaxVio (floor)" in out and f"overall: {report['verdict']} ({report['rule']})" in out
    assert [line.split()[0] for line in out.splitlines() if line[:1].isdigit()] == [str(n) for n in range(2, 9)]
    model_sha = hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()
    provenance = report["provenance"]
    assert provenance["checkpoint_sha256"] == model_sha and provenance["step"] == 40
    assert report["tokens"] == 1024 and provenance["data"]["tokens"] == 1024
    assert provenance["data"]["source"] == "builtin" and provenance["data"]["split"] == "heldout"
    assert provenance["router_mode"].startswith("eval") and "expert bias on" in provenance["router_mode"]
    assert provenance["tool_version"].startswith("vpmoe 0.1.0 (")
    markdown = (checkpoint / "audit" / "audit.md").read_text()
    assert markdown.startswith(f"# Expert-load audit: {report['verdict']}") and model_sha in markdown
    assert markdown == render_markdown(AuditReport.from_dict(report))
    assert "audits row written for run 'audited-run'" in err
    rows = queries.audits(Store(store_root), RUN)
    assert len(rows) == 1 and rows["verdict"][0] == report["verdict"] and rows["step"][0] == 40
    assert rows["checkpoint_sha256"][0] == model_sha and json.loads(rows["report_json"][0]) == report
    for layer in report["layers"]:
        assert layer["bias_bound"] == pytest.approx(RATE * 40) and layer["bias_max"] <= layer["bias_bound"] + 1e-9


def test_the_audit_routes_held_out_rows_through_the_real_router(checkpoint: Path) -> None:
    report = audit_checkpoint(checkpoint, tokens=256)
    ckpt = read_checkpoint(checkpoint)
    cfg = ckpt.config
    model = VpMoE(cfg)
    model.load_state_dict(ckpt.model_state)
    rows = PackedDataset(None, split="heldout", seq_length=cfg.training.seq_length, seed=cfg.training.seed).rows()
    tokens = torch.from_numpy(np.stack([row[:-1] for row, _ in itertools.islice(rows, 2)]))
    counts = []
    hooks = [router.topk_idx.register_forward_hook(
        lambda module, inputs, idx: counts.append(torch.bincount(idx.flatten(), minlength=16).numpy()))
        for router in model.routers()]
    with torch.no_grad():
        model.eval()(tokens)
    for hook in hooks:
        hook.remove()
    bias = np.stack([router.expert_bias.numpy() for router in model.routers()])
    oracle = audit_counts(np.stack(counts), 256, cfg.moe.topk, bias, cfg.moe.router_bias_update_rate, 40,
                          layers=list(range(2, 9)))
    assert report.layers == oracle.layers and report.verdict == oracle.verdict


def test_json_flag_and_a_store_without_the_run(checkpoint: Path, tmp_path: Path) -> None:
    code, out, err = run([str(checkpoint), "--tokens", "256", "--json", "--report-dir", str(tmp_path / "reports"),
                          "--store", str(tmp_path / "other-store")])
    report = json.loads(out)
    assert code == EXIT_CODES[report["verdict"]] and report["tokens"] == 256
    assert (tmp_path / "reports" / "audit.md").is_file()
    assert "no run 'audited-run'" in err and not (tmp_path / "other-store").exists()


def test_non_finite_weights_fail_with_exit_2_naming_the_tensor(checkpoint: Path, store_root: Path) -> None:
    ckpt = read_checkpoint(checkpoint)
    model = VpMoE(ckpt.config)
    model.load_state_dict(ckpt.model_state)
    with torch.no_grad():
        model.blocks[2].ffn.experts.fc1_weight[3, 0, 0] = float("nan")
    Store(store_root).create_run("nan-run", {"config": ckpt.config.to_dict()}).close()
    broken = save_checkpoint(store_root / "nan-run", 40, model, None, ckpt.config, {})
    code, out, _ = run([str(broken)])
    assert code == 2
    assert "non-finite weights: tensor 'blocks.2.ffn.experts.fc1_weight' has 1 NaN and 0 inf value(s)" in out
    report = json.loads((broken / "audit" / "audit.json").read_text())
    assert report["verdict"] == "FAIL" and "blocks.2.ffn.experts.fc1_weight" in report["rule"]
    assert queries.audits(Store(store_root), "nan-run")["verdict"].tolist() == ["FAIL"]


def copy_of(checkpoint: Path, folder: Path) -> Path:
    """A copy of the checkpoint folder (without its reports) under `folder`."""
    target = folder / checkpoint.name
    shutil.copytree(checkpoint, target, ignore=shutil.ignore_patterns("audit"))
    return target


def test_a_damaged_checkpoint_gives_exit_3_naming_the_file(checkpoint: Path, tmp_path: Path) -> None:
    damaged = copy_of(checkpoint, tmp_path)
    with (damaged / "model.safetensors").open("r+b") as handle:
        handle.seek(-8, 2)
        handle.write(b"\x00" * 8)
    code, out, err = run([str(damaged)])
    assert code == 3 and out == ""
    assert f"{damaged / 'model.safetensors'}: sha256 does not match" in err


def test_a_config_mismatch_gives_exit_3_naming_the_first_key(checkpoint: Path) -> None:
    code, _, err = run([str(checkpoint), "--config", str(ROOT / "configs" / "vpmoe.toml")])
    assert code == 3
    assert f"{checkpoint / SIDECAR}: checkpoint from another architecture: [attention].max_sequence_length" in err


def test_a_tensor_mismatch_gives_exit_3_naming_the_tensor(checkpoint: Path, tmp_path: Path) -> None:
    edited = copy_of(checkpoint, tmp_path)
    state = load_file(str(edited / "model.safetensors"))
    del state["blocks.3.ffn.router.weight"]
    save_file(state, str(edited / "model.safetensors"), metadata={"format": "pt"})
    meta = json.loads((edited / SIDECAR).read_text())
    meta["files"]["model.safetensors"] = hashlib.sha256((edited / "model.safetensors").read_bytes()).hexdigest()
    (edited / SIDECAR).write_text(json.dumps(meta))
    code, _, err = run([str(edited)])
    assert code == 3 and f"{edited / 'model.safetensors'}: missing tensor 'blocks.3.ffn.router.weight'" in err


def test_no_checkpoint_or_no_data_gives_exit_3(checkpoint: Path, tmp_path: Path) -> None:
    code, _, err = run([str(tmp_path / "checkpoint-000001")])
    assert code == 3 and f"{tmp_path / 'checkpoint-000001'}: not a checkpoint" in err
    code, _, err = run([str(checkpoint), "--data", str(tmp_path / "missing")])
    assert code == 3 and f"data path {tmp_path / 'missing'} does not exist" in err


# --- Page ----------------------------------------------------------------------------------------------


def audit_page(store_root: Path, run_id: str, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    """The Audit page on `store_root` with `run_id` chosen in the sidebar."""
    monkeypatch.setenv(STORE_ENV, str(store_root))
    test = AppTest.from_string(PAGE_DRIVER.format(page=str(ROOT / "pages" / "audit.py")), default_timeout=60)
    test.query_params["run"] = run_id
    test.run()
    assert not test.exception, [error.message for error in test.exception]
    return test


def test_audit_page_shows_verdicts_and_evidence(store_root: Path, audited: tuple[int, str, str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    test = audit_page(store_root, RUN, monkeypatch)
    verdict = json.loads(queries.audits(Store(store_root), RUN)["report_json"][0])["verdict"]
    assert verdict in test.metric[0].value
    tables = test.dataframe
    assert len(tables) == 2 and len(test.get("plotly_chart")) == 1 and len(test.get("download_button")) == 3
    assert any("audit.md" in text.value for text in test.text)


def test_audit_page_without_audits(store_root: Path, tiny_cfg: VpMoEConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    Store(store_root).create_run("never-audited", {"config": tiny_cfg.to_dict()}).close()
    test = audit_page(store_root, "never-audited", monkeypatch)
    assert "No audits recorded for this run" in test.info[0].value and not test.get("plotly_chart")


def test_reports_round_trip_through_json() -> None:
    counts = uniform_counts(4096, layers=2, seed=9)
    report = audit_counts(counts, 4096, K, dithering_bias(2, 50), RATE, 50)
    again = AuditReport.from_dict(json.loads(report.to_json()))
    assert again == report and render_markdown(again) == render_markdown(report)
    assert format_table(again) == format_table(report)
