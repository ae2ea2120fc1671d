"""The Streamlit dashboard's glue (`app.py` and `pages/*.py` import it; `import fasc` never does).

    choices   model picker choices, per-model defaults of the app, export folder, training checkpoints
    table     the rank-plan table and heatmap selection (pure, tested without Streamlit)
    format    small text formatters
    state     this browser session's durable state: settings, the plan store, the selected module
    ui        Streamlit resources, the sidebar, calibration / analysis with progress, one-line errors
"""
