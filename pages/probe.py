"""Probe: type a prompt, pick a checkpoint of the chosen run, and see each token's experts per MoE layer and one
head's attention (computed from the q and k hook points, so any attention kernel works)."""

from pathlib import Path

import pandas as pd
import streamlit as st

from analysis.probing import Probe
from app import panels, state
from app.probe_figures import attention_figure, routing_figure
from vpmoe.training.checkpoint import CheckpointError, list_checkpoints

MAX_PROMPT_CHARS = 2000
DEFAULT_PROMPT = "def area(radius):\n    return 3.14159 * radius ** 2\n\nThe area of a circle grows with its radius."


@st.cache_resource(max_entries=2, show_spinner="Loading the checkpoint...")
def load_probe(path: str) -> Probe:
    """The checkpoint's model wrapped for probing, shared by sessions (a Probe runs one trace at a time)."""
    return Probe.from_checkpoint(path)


@st.cache_data(max_entries=32, show_spinner=False)
def routing_rows(path: str, prompt: str) -> pd.DataFrame:
    """Probe.routing of the prompt on the checkpoint at `path`."""
    return load_probe(path).routing(prompt)


@st.cache_data(max_entries=64, show_spinner=False)
def attention_rows(path: str, prompt: str, layer: int, head: int) -> pd.DataFrame:
    """Probe.attention of one head on the checkpoint at `path`."""
    return load_probe(path).attention(prompt, layer, head)


st.title("Probe")
selection = state.require_run()
checkpoints = list_checkpoints(Path(selection.root) / str(selection.run))
if not checkpoints:
    st.info("This run has no checkpoints yet: they appear as checkpoint-NNNNNN folders in the run's folder.")
    st.stop()
checkpoint = st.selectbox("Checkpoint", checkpoints, index=len(checkpoints) - 1, format_func=lambda path: path.name,
                          key=f"probe-checkpoint:{selection.run}")
prompt = st.text_area("Prompt", value=DEFAULT_PROMPT, max_chars=MAX_PROMPT_CHARS, key="probe-prompt")
if not prompt.strip():
    st.info("Type a prompt to see how its tokens are routed.")
    st.stop()
path = str(checkpoint)
try:
    probe = load_probe(path)
    routing = routing_rows(path, prompt)
except CheckpointError as error:
    st.error("This checkpoint cannot be loaded:")
    st.text(str(error))
    st.stop()
except ValueError as error:
    st.warning("This prompt cannot be probed:")
    st.text(str(error))
    st.stop()

source = f"probe = Probe.from_checkpoint({path!r})"
panels.chart(routing_figure(routing, probe.num_experts), routing, key="probe-routing",
             calls=[source, "probe.routing(prompt)"],
             caption="Each cell shows the expert with the largest gate for that token (column) in that MoE layer "
                     "(row); hover for all top-k experts with their gates (they sum to the scaling factor) and "
                     "unbiased scores. Layer 1 is dense and has no router.")

st.subheader("Attention of one head")
columns = st.columns(2)
layers = list(range(1, len(probe.model.blocks) + 1))
with columns[0]:
    layer = panels.choose("Layer", layers, key="probe-layer", default=layers[0],
                          help="Layers 4, 8, ... are global (ALiBi); the rest slide a local window.")
with columns[1]:
    heads = list(range(probe.cfg.model.num_attention_heads))
    head = panels.choose("Head", heads, key="probe-head", default=0)
attention = attention_rows(path, prompt, layer, head)
panels.chart(attention_figure(attention), attention, key="probe-attention",
             calls=[source, f"probe.attention(prompt, {layer}, {head})"],
             caption="Row = query token, column = key token: the probability the query gives each key, with the "
                     "sink (attending to nothing) in the narrow column. The dotted line marks the oldest key a local "
                     "head still sees (the window counts the query itself).")
