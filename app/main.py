"""The dashboard's entrypoint (`streamlit run app/main.py`, or `vpmoe serve --store DIR`): page config,
the shared sidebar, and navigation over the pages in pages/."""

import streamlit as st

from app import state

st.set_page_config(page_title="vpMoE dashboard", page_icon="🧭", layout="wide")

PAGES = [
    st.Page("../pages/runs.py", title="Runs", icon=":material/monitoring:", default=True),
    st.Page("../pages/expert_load.py", title="Expert load", icon=":material/grid_on:"),
    st.Page("../pages/expert_bias.py", title="Expert bias", icon=":material/tune:"),
    st.Page("../pages/value_residual.py", title="Value residual", icon=":material/stacked_line_chart:"),
    st.Page("../pages/attention.py", title="Attention", icon=":material/center_focus_strong:"),
    st.Page("../pages/specialisation.py", title="Specialisation", icon=":material/category:"),
    st.Page("../pages/probe.py", title="Probe", icon=":material/search:"),
    st.Page("../pages/audit.py", title="Audit", icon=":material/fact_check:"),
]

navigation = st.navigation(PAGES)
state.draw_sidebar()
navigation.run()
