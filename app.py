"""FASC dashboard (placeholder until the dashboard lands): `make run` starts it."""

import streamlit as st

st.set_page_config(page_title="FASC", layout="wide")
st.title("FASC — knowledge-aware low-rank compression")
st.info("The dashboard is under construction; use the `fasc` command line meanwhile (`fasc --help`).")
