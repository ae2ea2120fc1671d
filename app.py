"""FASC dashboard: `make run` (= `streamlit run app.py`) opens it on the embedded demo model.

The entry point holds the sidebar model picker (so it persists across pages) and the navigation;
each page in `pages/` is a thin script over the library and the app package `fasc.app` (Streamlit
glue in `fasc.app.ui` / `fasc.app.state`; the figures in `fasc.plots`).

Environment (optional): FASC_APP_MODEL (model preselected, e.g. a folder), FASC_APP_DEVICE (its
device: cpu, cuda, cuda:i, auto), FASC_APP_CHECKPOINTS
(training checkpoints folder), FASC_APP_OUT (export parent folder), FASC_CACHE (statistics cache).
"""

import streamlit as st

from fasc.app import ui

st.set_page_config(page_title="FASC — knowledge-aware compression", page_icon=":material/compress:", layout="wide")

pages = [
    st.Page(ui.PAGES["calibration"], title="Model & calibration", icon=":material/tune:", url_path="calibration",
            default=True),
    st.Page(ui.PAGES["rho"], title="ρ map", icon=":material/grid_on:", url_path="rho"),
    st.Page(ui.PAGES["spectra"], title="Spectra", icon=":material/ssid_chart:", url_path="spectra"),
    st.Page(ui.PAGES["ranks"], title="Ranks", icon=":material/stacked_bar_chart:", url_path="ranks"),
    st.Page(ui.PAGES["export"], title="Export", icon=":material/download:", url_path="export"),
    st.Page(ui.PAGES["training"], title="Knowledge over training", icon=":material/timeline:", url_path="training"),
]
nav = st.navigation(pages)
ui.model_picker()
nav.run()
