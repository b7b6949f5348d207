"""Reading attribute values from pydicom datasets the same way everywhere (PACS answers, files)."""

from __future__ import annotations

from pydicom.dataset import Dataset


def text(ds: Dataset, keyword: str) -> str:
    """The value as text: ``""`` when absent, multi-values in DICOM's backslash form, stripped."""
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def integer(ds: Dataset, keyword: str) -> int | None:
    """The value as an int, or ``None`` when absent or not a number."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
