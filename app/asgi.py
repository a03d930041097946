"""The dashboard as the ASGI app that `vpmoe serve` runs (`streamlit run app/asgi.py`): app/main.py served
by Streamlit's st.App with PageHints, which saves a page opened by its own address a health probe and
preloads the plotly bundle. `streamlit run app/main.py` serves the same pages without the hints."""

from pathlib import Path

import streamlit as st
from starlette.middleware import Middleware
from streamlit import config
from streamlit.file_util import get_static_dir

from app.page_hints import PageHints, plotly_bundle

hints = Middleware(PageHints, base_url_path=config.get_option("server.baseUrlPath"),
                   bundle=plotly_bundle(Path(get_static_dir())))
app = st.App(str(Path(__file__).resolve().with_name("main.py")), middleware=[hints])
