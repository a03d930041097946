"""Audit: the verdicts `vpmoe audit` recorded for the chosen run, and one audit's per-layer evidence."""

import json

import streamlit as st

from analysis import queries
from analysis.audit import AuditReport, render_markdown
from app import data, panels, state
from app.probe_figures import audit_max_vio_figure

TABLE_COLUMNS = ["step", "verdict", "rule", "tokens", "created_at", "checkpoint", "checkpoint_sha256"]
LAYER_COLUMNS = ["layer", "verdict", "rule", "tokens", "max_vio", "max_vio_floor", "cv", "cv_floor", "entropy",
                 "entropy_floor", "dead", "expected_dead", "starved", "expected_starved", "bias_max", "bias_bound"]


def parse(report_json: str) -> AuditReport | None:
    """The report stored with an audits row, or None when it cannot be read."""
    try:
        return AuditReport.from_dict(json.loads(report_json))
    except (ValueError, KeyError, TypeError):
        return None


st.title("Audit")
selection = state.require_run()
run = str(selection.run)
rows = queries.audits(data.open_store(str(selection.root)), run)
if rows.empty:
    st.info("No audits recorded for this run. Audit a checkpoint with `vpmoe audit RUN_FOLDER/checkpoint-NNNNNN`; "
            "its verdict appears here.")
    st.stop()

reports = [parse(text) for text in rows["report_json"]]
table = rows.assign(rule=[report.rule if report else "(report unreadable)" for report in reports])[TABLE_COLUMNS]
st.dataframe(table, hide_index=True, key="audit-table")
st.caption("One row per audit of this run's checkpoints, oldest first; the rule is what decided the verdict.")

choice = st.selectbox("Audit", list(range(len(rows)))[::-1], key=f"audit-row:{run}",
                      format_func=lambda i: f"step {rows['step'].iloc[i]}, {rows['created_at'].iloc[i]}: "
                                            f"{rows['verdict'].iloc[i]}")
report = reports[choice]
if report is None:
    st.warning("This audit's stored report cannot be read.")
    st.stop()

cells = st.columns(3)
cells[0].metric("Verdict", report.verdict)
cells[1].metric("Tokens audited", f"{report.tokens:,}")
cells[2].metric("Layers", len(report.layers))
st.text(f"Decided by: {report.rule}")
st.text(f"Thresholds: {report.thresholds.describe(len(report.layers))}")
if report.layers:
    layers = report.layers_frame()
    evidence = layers.assign(dead=layers["dead"].map(len), starved=layers["starved"].map(len))[LAYER_COLUMNS]
    panels.chart(audit_max_vio_figure(layers, report.thresholds.max_vio_warn_margin,
                                      report.thresholds.max_vio_margin),
                 evidence, key="audit-max-vio", calls=[f"queries.audits(store, {run!r})"],
                 caption="MaxVio (busiest expert's load over its fair share, minus 1) per MoE layer, coloured by the "
                         "layer's verdict, against the MaxVio that perfectly uniform routing reaches at this token "
                         "count (noise floor) and the WARN and FAIL lines above it.")
    st.dataframe(evidence, hide_index=True, key="audit-layers")
    st.caption("Each figure beside uniform routing's value at the same token count: floors for MaxVio, CV and "
               "normalised entropy, and the dead and starved experts uniform routing would leave (expected_*).")
files = report.provenance.get("reports") or {}
if files:
    st.text("Report files: " + ", ".join(str(path) for path in files.values()))
downloads = st.columns(2)
downloads[0].download_button("Report (Markdown)", data=render_markdown(report), file_name="audit.md",
                             mime="text/markdown", key="audit-md", on_click="ignore")
downloads[1].download_button("Report (JSON)", data=report.to_json(), file_name="audit.json",
                             mime="application/json", key="audit-json", on_click="ignore")
with st.expander("Provenance"):
    st.json(report.provenance)
