"""ActTail Explorer dashboard (Streamlit). Run with ``streamlit run app/main.py``."""
