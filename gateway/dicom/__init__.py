"""DICOM helpers that are not tied to one PACS adapter (synthetic test studies, ...)."""
