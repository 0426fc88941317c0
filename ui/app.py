"""The phisearch UI (Streamlit): `idx ui` serves this file. Widgets only; the work is done by
phisearch.search and phisearch.indexer. Store and model are held once per server process
(ui/common.py says how the one Edge handle is shared)."""

from __future__ import annotations

import streamlit as st
from phisearch.ui import common

st.set_page_config(page_title="phisearch", page_icon=":mag:", layout="wide")

PAGES = [
    st.Page("views/search.py", title="Search", icon=":material/search:", default=True),
    st.Page("views/explain.py", title="Explain", icon=":material/compare:"),
    st.Page("views/clusters.py", title="Clusters", icon=":material/bubble_chart:"),
    st.Page("views/channels.py", title="Channels", icon=":material/tune:"),
    st.Page("views/reconstruct.py", title="Reconstruct", icon=":material/auto_awesome:"),
    st.Page("views/index.py", title="Index", icon=":material/database:"),
]
page = st.navigation(PAGES)

s = common.settings()
with st.sidebar:
    st.caption(f"Store: `{s.where}`")
    h = common.holder(s)
    if h.releases_when_idle:
        state = "open" if h.is_open else "closed"
        st.caption(f"Handle {state}; handed over as soon as another process (`idx build`...) "
                   "asks for the store.")
        if h.is_open and st.button("Release the store now"):
            h.release()
            st.rerun()

page.run()
