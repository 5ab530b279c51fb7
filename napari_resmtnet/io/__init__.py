"""Reading scans: `load_scan` and the file formats it knows (`formats`), the PACS client
(`pacs`, DICOMweb), and the numpy preprocessing that turns a scan into model input
(`preprocess`).

May import the core (top-level numpy-only modules) only; never torch or Qt at import time.
"""
