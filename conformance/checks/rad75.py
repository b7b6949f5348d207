"""RAD-75 answers (family ``rad75``): every requested instance delivered as the object the KOS references,
as a readable DICOM Part 10 file in one of the requested transfer syntaxes."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import FileDataset
from pydicom.errors import InvalidDicomError

from conformance import spec
from conformance.checks.common import check, listing
from conformance.checks.retrieve import echo_problems
from conformance.model import Check
from gateway.ihe import ebrim
from gateway.ihe.iti39 import DocumentRequest, RetrievedDocument, RetrieveResult
from gateway.ihe.registry import SUCCESS

#: transfer syntaxes whose Pixel Data length is predictable from the image attributes
UNCOMPRESSED = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"})


@dataclass(frozen=True)
class ImageItem:
    """One instance to request (from a KOS reference)."""

    home_community_id: str
    repository_unique_id: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str

    @property
    def request(self) -> DocumentRequest:
        return DocumentRequest(self.home_community_id, self.repository_unique_id, self.sop_instance_uid)


def read_instance(doc: RetrievedDocument) -> FileDataset | str:
    """The returned object parsed as DICOM Part 10 (pixel data included), or why it is not one."""
    source: Any
    if isinstance(doc.attachment, Path):
        source = doc.attachment
    elif doc.data is not None:
        source = io.BytesIO(doc.data)
    else:
        return "no content"
    try:
        ds = dcmread(source)
        _ = ds.get("PixelData")  # force reading every element up to the pixels
    except InvalidDicomError as exc:
        return f"not a DICOM Part 10 file ({exc})"
    except (OSError, ValueError, KeyError, IndexError, EOFError, TypeError, AttributeError) as exc:
        return f"unreadable DICOM ({type(exc).__name__}: {exc})"
    if "PixelData" in ds and str(ds.file_meta.get("TransferSyntaxUID", "")) in UNCOMPRESSED:
        try:
            expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
                        * ((int(ds.BitsAllocated) + 7) // 8) * int(ds.get("NumberOfFrames", 1) or 1))
        except (AttributeError, TypeError, ValueError):
            expected = 0
        got = len(ds.PixelData)
        if expected and got < expected:
            return f"Pixel Data has {got} bytes, the image attributes need {expected} (truncated object)"
    return ds


def delivery_checks(result: RetrieveResult, items: Sequence[ImageItem], transfer_syntaxes: Sequence[str], *,
                    expect_all: bool = True) -> list[Check]:
    """The delivered instances of ``items``. With ``expect_all`` every item must come back (status Success);
    otherwise each item is either delivered or refused with an Error RegistryError naming it."""
    out: list[Check] = []
    by_uid = {i.sop_instance_uid: i for i in items}
    delivered = {d.document_unique_id.strip() for d in result.documents}
    errors = [e for e in result.errors if e.is_error]
    if expect_all:
        ok = result.status == SUCCESS and not errors
        out.append(check("rad75.status", "rad75", "the retrieve succeeds (status Success, no RegistryError)",
                         spec.STATUS, ok, "" if ok else f"status {result.status or 'missing'}"
                         + (f"; {listing([f'{e.code}: {e.context}' for e in errors])}" if errors else "")))
        missing = [u for u in by_uid if u not in delivered]
        out.append(check("rad75.all-returned", "rad75", "every requested instance is returned", spec.RAD75_RESPONSE,
                         not missing, f"missing: {listing(missing)}" if missing else f"{len(delivered)} returned"))
    else:
        located = " ".join(e.location or "" for e in errors)
        silent = [u for u in by_uid if u not in delivered and u not in located]
        out.append(check("rad75.answered", "rad75", "every requested instance is returned or refused with an error "
                         "naming it", spec.RAD75_RESPONSE, not silent, f"neither: {listing(silent)}" if silent else ""))
    problems = echo_problems(result.documents, [i.request for i in items]) + result.problems
    out.append(check("rad75.echo", "rad75", "DocumentResponses echo HomeCommunityId, RepositoryUniqueId and "
                     "DocumentUniqueId", spec.RETRIEVE_RESPONSE, not problems, listing(problems)))
    bad_mime = [f"{d.document_unique_id}: {d.mime_type or 'none'}" for d in result.documents
                if d.mime_type != ebrim.MIME_DICOM]
    out.append(check("rad75.mime-type", "rad75", "mimeType is application/dicom", spec.RAD75_RESPONSE,
                     not bad_mime, listing(bad_mime)))
    unreadable: list[str] = []
    wrong: list[str] = []
    syntax: list[str] = []
    for doc in result.documents:
        uid = doc.document_unique_id.strip()
        ds = read_instance(doc)
        if isinstance(ds, str):
            unreadable.append(f"{uid}: {ds}")
            continue
        item = by_uid.get(uid)
        if item is not None:
            for keyword, want in (("SOPInstanceUID", item.sop_instance_uid), ("SeriesInstanceUID", item.series_uid),
                                  ("StudyInstanceUID", item.study_uid), ("SOPClassUID", item.sop_class_uid)):
                have = str(ds.get(keyword, ""))
                if want and have != want:
                    wrong.append(f"{uid}: {keyword} {have or 'missing'}, the KOS says {want}")
        ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
        if ts not in transfer_syntaxes:
            syntax.append(f"{uid}: {ts or 'no transfer syntax'}, requested {' or '.join(transfer_syntaxes)}")
    out.append(check("rad75.dicom", "rad75", "every returned instance is a complete DICOM Part 10 object",
                     spec.DICOM_FILE, not unreadable, listing(unreadable, 3)))
    out.append(check("rad75.identity", "rad75", "each object is the instance the KOS references (SOP Instance, "
                     "Series, Study, SOP Class)", spec.RAD75_RESPONSE, not wrong, listing(wrong, 3)))
    out.append(check("rad75.transfer-syntax", "rad75", "each object is encoded in a requested transfer syntax",
                     spec.RAD75_TRANSFER_SYNTAX, not syntax, listing(syntax)))
    return out


__all__ = ["UNCOMPRESSED", "ImageItem", "delivery_checks", "read_instance"]
