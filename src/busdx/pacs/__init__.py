"""Talking to the PACS: results as DICOM objects (SR, SEG)."""
