"""The UI's pages: Streamlit scripts that ui/app.py runs through st.navigation (not imported).
The folder is not called pages/: Streamlit would then also serve each file as a page of its own,
without app.py, when a browser first opens its URL."""
