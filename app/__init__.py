"""The Streamlit dashboard: entrypoint, shared sidebar and pure plotly figure builders."""
