"""Reconciling an outside instance to local identifiers before it is imported (pure: bytes in, bytes out).

The import station pulls prior studies from partner communities. Before they reach the local
PACS their patient and order identification is *coerced* to the local values, as the ACR/SIIM
imaging-sharing whitepaper ("Reconciling Imaging Records") and IHE IRWF.b/SWF.b ask: the local
Patient ID with its issuer, the local demographics, the accession number per site policy, and an
optional "outside" label. What was replaced is kept in the instance itself, in the Original
Attributes Sequence of the SOP Common module (PS3.3 C.12.1, Table C.12-1; the Original Attributes
Macro, Table C.12.1.1.9-1, and C.12.1.1.9 in recent editions):

* Original Attributes Sequence (0400,0561): one item is appended per reconciliation that changed
  anything, with
* > Attribute Modification DateTime (0400,0562), Type 1: when (``now``, default the local clock);
* > Modifying System (0400,0563), Type 1: :attr:`ReconcilePolicy.modifying_system`;
* > Source of Previous Values (0400,0564), Type 2: :attr:`ReconcilePolicy.source_of_previous_values`
  (the partner's homeCommunityId or organisation);
* > Reason for the Attribute Modification (0400,0565), Type 1: ``COERCE`` ("replace, add or remove
  values of Attributes such as Patient Name, ID, Accession Number ... during import of media from
  an external institution, or reconciliation against a master patient index");
* > Modified Attributes Sequence (0400,0550), Type 1, exactly one item: every attribute this
  reconciliation changed, with its previous value. An attribute that was *added* (absent before,
  e.g. Issuer of Patient ID) is recorded with zero length, so the item fully describes the previous
  state. When the character set had to change (below), the previous Specific Character Set is in
  the item as well, which makes it the character set of the item (PS3.5 7.5.3): the previous values
  keep their previous encoding.

What changes (everything else, pixel data included, is written back untouched):

* Patient's Name, Patient ID, Issuer of Patient ID, Issuer of Patient ID Qualifiers Sequence
  (Universal Entity ID + ``ISO`` when the local issuer is an OID), Patient's Birth Date and Sex
  (PS3.3 C.7.1.1) take the :class:`LocalPatient` values.
* Other Patient IDs Sequence (0010,1002) gains the outside Patient ID and its issuer (Type of
  Patient ID ``TEXT``) when :attr:`ReconcilePolicy.keep_other_ids`: the link to the source
  community stays visible to every DICOM reader, not only to those that read Original Attributes.
* Accession Number (0008,0050) and Issuer of Accession Number Sequence (0008,0051) per
  :attr:`ReconcilePolicy.accession`, and the same for the accession numbers inside Request
  Attributes Sequence (0040,0275) and, in a KOS, Referenced Request Sequence (0040,A370), so the
  instance does not contradict itself.
* Study Description (0008,1030) gets the outside marker (:attr:`ReconcilePolicy.outside_marker`).
  XIG marks the *study description* only: it is the label worklists, viewers and the EMR show
  for a study ("outside films"). Institution Name (0008,0080) is left alone: it belongs to General
  Equipment and already names where the images were acquired; the source community is recorded in
  Source of Previous Values.
* Specific Character Set becomes ``ISO_IR 192`` (UTF-8) only when a new value is not plain ASCII
  and cannot be encoded in the instance's own single character set (with ISO 2022 code extensions
  XIG does not compose escape sequences: it switches); every text value is then re-encoded.

Choices:

* **UIDs are kept** (Study, Series and SOP Instance UID, File Meta media storage UIDs, transfer
  syntax). Coercing identification does not change what was acquired (PS3.3 C.12.1.1.9 exists
  for exactly this), references from the partner's KOS, presentation states and reports stay
  valid, and a re-import of the same instance is recognised by the PACS as the same instance
  (idempotent) instead of piling up copies under fresh UIDs. The price: if these UIDs already
  exist locally under another patient (e.g. a study that originally came from here), the PACS
  will report a conflict; that is detected at storage time, not silently hidden by re-UIDing.
  The File Meta keeps everything but the Implementation Class UID / Version Name, which name the
  implementation that wrote the file (PS3.10 7.1) and so become XIG's, as in
  :mod:`gateway.dicom.transcode`; Source Application Entity Title (0002,0016), "the AE that wrote
  this file's content", is removed for the same reason.
* **Pixel data is never decoded**: Pixel Data (native or encapsulated) is written back byte for
  byte in the original transfer syntax.
* **Idempotence**: reconciling an instance this gateway has already reconciled (its Patient ID and
  issuer are the local ones, and the trailing Original Attributes items are this gateway's:
  same Modifying System, Source of Previous Values, reason COERCE) starts from the *original*
  values recorded in those items: the check runs against the original patient, and the policy is
  applied to the original values (no double prefix, no double marker). If that gives what the
  instance already holds, nothing changes and no item is added: the output is the input, byte for
  byte. If the policy changed in between, one new item records the intermediate values. An outside
  instance merely *claiming* such a history is not trusted: its current Patient ID/issuer would
  have to be the local ones already.

Functions: :func:`check` (refuse an instance that does not belong to the expected patient/study),
:func:`reconcile_dataset` (in place), :func:`reconcile` (Part 10 bytes), :func:`reconcile_file`
(atomic write), :func:`reconcile_kos` (the manifest itself, verified with
:func:`~gateway.dicom.kos.parse_kos`). One instance is held in memory at a time.
"""

from __future__ import annotations

import copy
import io
import re
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Literal, get_args

from pydicom import dcmread, dcmwrite
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import UID

from gateway.dicom.kos import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, KosError, KosManifest, parse_kos
from gateway.errors import XigError
from gateway.files import atomic_write

__all__ = [
    "AccessionPolicy",
    "Expected",
    "LocalPatient",
    "ReconcileError",
    "ReconcilePolicy",
    "check",
    "reconcile",
    "reconcile_dataset",
    "reconcile_file",
    "reconcile_kos",
]

AccessionPolicy = Literal["keep", "prefix", "clear", "local"]

#: Reason for the Attribute Modification (0400,0565), PS3.3 C.12.1 Defined Term
REASON_COERCE = "COERCE"

# Tags (PS3.6)
_CHARSET = 0x00080005  # Specific Character Set
_ACCESSION = 0x00080050  # Accession Number
_ACCESSION_ISSUER = 0x00080051  # Issuer of Accession Number Sequence
_STUDY_DESCRIPTION = 0x00081030
_PATIENT_NAME = 0x00100010
_PATIENT_ID = 0x00100020
_ISSUER = 0x00100021  # Issuer of Patient ID
_TYPE_OF_PATIENT_ID = 0x00100022
_QUALIFIERS = 0x00100024  # Issuer of Patient ID Qualifiers Sequence
_BIRTH_DATE = 0x00100030
_SEX = 0x00100040
_OTHER_IDS = 0x00101002  # Other Patient IDs Sequence
_LOCAL_NAMESPACE = 0x00400031  # Local Namespace Entity ID
_UNIVERSAL_ID = 0x00400032  # Universal Entity ID
_UNIVERSAL_ID_TYPE = 0x00400033  # Universal Entity ID Type
_REQUEST_ATTRIBUTES = 0x00400275  # Request Attributes Sequence
_REFERENCED_REQUEST = 0x0040A370  # Referenced Request Sequence (KOS, SR)
_MODIFIED = 0x04000550  # Modified Attributes Sequence
_ORIGINAL = 0x04000561  # Original Attributes Sequence
_MODIFICATION_DATETIME = 0x04000562
_MODIFYING_SYSTEM = 0x04000563
_SOURCE_OF_PREVIOUS = 0x04000564
_REASON = 0x04000565
_SOURCE_AE_TITLE = 0x00020016  # File Meta: Source Application Entity Title

#: every attribute reconciliation may change (except Specific Character Set, handled apart)
_TRACKED = (
    _ACCESSION, _ACCESSION_ISSUER, _STUDY_DESCRIPTION, _PATIENT_NAME, _PATIENT_ID, _ISSUER, _QUALIFIERS,
    _BIRTH_DATE, _SEX, _OTHER_IDS, _REQUEST_ATTRIBUTES, _REFERENCED_REQUEST,
)
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})

_OID_RE = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_DA_RE = re.compile(r"^[0-9]{8}$")

Elem = DataElement | None


class ReconcileError(XigError):
    """The instance cannot (or must not) be reconciled: not DICOM, not the expected patient/study, bad input."""


# --------------------------------------------------------------------------------------------
# value hygiene


def _bare_oid(value: str | None) -> str:
    v = (value or "").strip()
    return v[8:] if v.lower().startswith("urn:oid:") else v


def _is_oid(value: str) -> bool:
    return bool(_OID_RE.match(value)) and len(value) <= 64


def _check_string(what: str, value: str, max_chars: int, *, required: bool) -> None:
    """A single-valued string (SH, LO): no backslash or control characters, within the length limit."""
    if required and not value.strip():
        raise ReconcileError(f"{what} is empty")
    if len(value) > max_chars:
        raise ReconcileError(f"{what} {value!r} is longer than {max_chars} characters")
    if any(ch < " " or ch == "\\" for ch in value):
        raise ReconcileError(f"{what} {value!r} contains a backslash or a control character")


def _check_person_name(what: str, value: str) -> None:
    """PN (PS3.5 6.2.1): at most 3 component groups of at most 5 components, 64 characters each."""
    if any(ch < " " or ch == "\\" for ch in value):
        raise ReconcileError(f"{what} {value!r} contains a backslash or a control character")
    groups = value.split("=")
    if len(groups) > 3:
        raise ReconcileError(f"{what} {value!r} has more than 3 component groups")
    for group in groups:
        if len(group) > 64 or len(group.split("^")) > 5:
            raise ReconcileError(f"{what} {value!r}: a component group is longer than 64 characters "
                                 "or has more than 5 components")


def _check_date(what: str, value: str) -> None:
    if value == "":
        return
    try:
        if not _DA_RE.match(value):
            raise ValueError(value)
        datetime.strptime(value, "%Y%m%d")
    except ValueError:
        raise ReconcileError(f"{what} {value!r} is not a DICOM date (YYYYMMDD)") from None


# --------------------------------------------------------------------------------------------
# inputs


@dataclass(frozen=True)
class LocalPatient:
    """The local identity the instance is reconciled to (from the local MPI/EMR, after XCPD).

    ``issuer`` is the local assigning authority: an OID (``urn:oid:`` accepted and stripped) is
    written to Issuer of Patient ID (0010,0021) and to Issuer of Patient ID Qualifiers Sequence
    (0010,0024) > Universal Entity ID (0040,0032) with Universal Entity ID Type (0040,0033) ``ISO``;
    any other namespace name goes to Issuer of Patient ID only. ``name`` is a DICOM PN
    (``Family^Given^Middle^Prefix^Suffix``), ``birth_date`` ``YYYYMMDD`` or empty, ``sex`` ``M``,
    ``F``, ``O`` or empty.
    """

    patient_id: str
    issuer: str
    name: str = ""
    birth_date: str = ""
    sex: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "issuer", _bare_oid(self.issuer))
        _check_string("local Patient ID", self.patient_id, 64, required=True)
        _check_string("local issuer of Patient ID", self.issuer, 64, required=True)
        _check_person_name("local Patient's Name", self.name)
        _check_date("local Patient's Birth Date", self.birth_date)
        if self.sex not in ("", "M", "F", "O"):
            raise ReconcileError(f"local Patient's Sex {self.sex!r} is not M, F, O or empty")


@dataclass(frozen=True)
class Expected:
    """What an instance must belong to before it is touched.

    ``patient_id``/``issuer``: the partner's Patient ID as correlated by XCPD (the issuer is the
    partner's assigning authority, compared only when the instance names one too).
    ``study_uids``: the Study Instance UID(s) of the retrieve plan (the KOS).
    """

    patient_id: str
    study_uids: Collection[str]
    issuer: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "patient_id", self.patient_id.strip())
        object.__setattr__(self, "study_uids", frozenset(u.strip() for u in self.study_uids if u.strip()))
        object.__setattr__(self, "issuer", _bare_oid(self.issuer) or None)
        if not self.patient_id:
            raise ReconcileError("the expected Patient ID is empty")
        if not self.study_uids:
            raise ReconcileError("no expected Study Instance UID: every instance would be refused")

    @classmethod
    def for_manifest(cls, manifest: KosManifest, *, patient_id: str, issuer: str | None = None) -> Expected:
        """The studies of a parsed KOS, for the partner patient XCPD correlated (not the KOS's own claim)."""
        uids = {manifest.study_instance_uid, *(r.study_uid for r in manifest.references)}
        return cls(patient_id=patient_id, study_uids=frozenset(u for u in uids if u), issuer=issuer)


@dataclass(frozen=True)
class ReconcilePolicy:
    """Site policy for what reconciliation does beyond the patient identity.

    ``accession``:

    * ``keep``: Accession Number and its issuer stay as the partner sent them;
    * ``prefix``: ``accession_prefix + original``, clipped to 16 characters (SH); the Issuer of
      Accession Number Sequence is removed (no order filler issued the prefixed value). An empty
      accession stays empty;
    * ``clear``: Accession Number emptied (it is Type 2), issuer removed;
    * ``local``: ``local_accession`` (the local order created for the import), with
      ``local_accession_issuer`` as its issuer (OID → Universal Entity ID, else Local Namespace
      Entity ID) or no issuer.

    The original value is always in the Original Attributes Sequence.

    ``outside_marker``: append ``" " + outside_marker_text`` to Study Description, the original
    text clipped so the result fits 64 characters (LO) and the marker stays visible; a description
    already ending with the marker is left alone.

    ``modifying_system`` (LO, Type 1) names this gateway in the Original Attributes items; make it
    specific to the deployment (e.g. ``"XIG <home community OID>"``) when partners run XIG too.
    ``source_of_previous_values`` (LO, Type 2): the partner's homeCommunityId or organisation.
    ``keep_other_ids``: record the partner's Patient ID + issuer in Other Patient IDs Sequence.
    """

    accession: AccessionPolicy = "keep"
    accession_prefix: str = ""
    local_accession: str = ""
    local_accession_issuer: str | None = None
    outside_marker: bool = True
    outside_marker_text: str = "[OUTSIDE]"
    modifying_system: str = "XIG"
    source_of_previous_values: str = ""
    keep_other_ids: bool = True

    def __post_init__(self) -> None:
        if self.accession not in get_args(AccessionPolicy):
            choices = ", ".join(get_args(AccessionPolicy))
            raise ReconcileError(f"accession policy {self.accession!r} is not one of {choices}")
        if self.accession == "prefix":
            _check_string("accession prefix", self.accession_prefix, 15, required=True)
        if self.accession == "local":
            _check_string("local accession number", self.local_accession, 16, required=True)
        object.__setattr__(self, "local_accession_issuer", _bare_oid(self.local_accession_issuer) or None)
        if self.local_accession_issuer is not None:
            _check_string("local accession issuer", self.local_accession_issuer, 64, required=True)
        if self.outside_marker:
            _check_string("outside marker", self.outside_marker_text, 63, required=True)
        _check_string("Modifying System", self.modifying_system, 64, required=True)
        _check_string("Source of Previous Values", self.source_of_previous_values, 64, required=False)


# --------------------------------------------------------------------------------------------
# reading values


def _text(elem: Elem) -> str:
    """An element's value as text: ``""`` when absent/empty, multi-values joined by backslash."""
    if elem is None or elem.value is None:
        return ""
    value = elem.value
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("latin-1").strip(" \x00")
    return str(value).strip()


def _get(ds: Dataset, tag: int) -> Elem:
    return ds[tag] if tag in ds else None


def _items(elem: Elem) -> list[Dataset]:
    if elem is None or elem.VR != "SQ" or not elem.value:
        return []
    return list(elem.value)


def _issuers(ds: Dataset) -> tuple[str, ...]:
    """Every issuer the patient identification of ``ds`` names: Issuer of Patient ID, then the qualifiers."""
    found = [_bare_oid(_text(_get(ds, _ISSUER)))]
    for item in _items(_get(ds, _QUALIFIERS)):
        found.append(_bare_oid(_text(_get(item, _UNIVERSAL_ID))))
        found.append(_text(_get(item, _LOCAL_NAMESPACE)))
    return tuple(dict.fromkeys(v for v in found if v))


def _cx(patient_id: str, issuers: Iterable[str]) -> str:
    """HL7 CX notation for messages: ``id^^^&oid&ISO`` or ``id^^^namespace``."""
    issuer = next(iter(issuers), "")
    if not issuer:
        return patient_id
    return f"{patient_id}^^^&{issuer}&ISO" if _is_oid(issuer) else f"{patient_id}^^^{issuer}"


def _same(a: Elem, b: Elem) -> bool:
    """Equal values; an absent sequence equals an empty one, an absent text does not equal an empty one."""
    if a is None or b is None:
        other = a if b is None else b
        return other is None or (other.VR == "SQ" and not other.value)
    if a.VR == "SQ" or b.VR == "SQ":
        x, y = _items(a), _items(b)
        return a.VR == b.VR and len(x) == len(y) and all(_same_dataset(i, j) for i, j in zip(x, y, strict=True))
    return _text(a) == _text(b)


def _same_dataset(a: Dataset, b: Dataset) -> bool:
    tags = set(a.keys()) | set(b.keys())
    return all(_same(_get(a, t), _get(b, t)) for t in tags)


# --------------------------------------------------------------------------------------------
# the check


def check(ds: Dataset, expected: Expected) -> None:
    """Refuse (``ReconcileError``) an instance that is not the expected patient's or not of an expected study.

    The Patient ID must equal :attr:`Expected.patient_id`; when both the instance (Issuer of Patient
    ID or Issuer of Patient ID Qualifiers Sequence) and :attr:`Expected.issuer` name an issuer, it
    must be the same. The Study Instance UID must be one of :attr:`Expected.study_uids`.
    """
    sop = _text(_get(ds, 0x00080018)) or "(without SOP Instance UID)"
    patient_id = _text(_get(ds, _PATIENT_ID))
    if not patient_id:
        raise ReconcileError(f"instance {sop} has no Patient ID: refused")
    issuers = _issuers(ds)
    wanted = expected.issuer
    if patient_id != expected.patient_id or (wanted and issuers and wanted not in issuers):
        raise ReconcileError(
            f"instance {sop} belongs to patient {_cx(patient_id, issuers)}, "
            f"expected {_cx(expected.patient_id, [wanted] if wanted else [])}: refused"
        )
    study = _text(_get(ds, 0x0020000D))
    if not study:
        raise ReconcileError(f"instance {sop} has no Study Instance UID: refused")
    if study not in expected.study_uids:
        raise ReconcileError(
            f"instance {sop} belongs to study {study}, expected {' or '.join(sorted(expected.study_uids))}: refused"
        )


# --------------------------------------------------------------------------------------------
# history: what this gateway already changed


def _own_history(ds: Dataset, policy: ReconcilePolicy) -> list[Dataset]:
    """The Modified Attributes items of the trailing Original Attributes items written by this gateway, oldest first."""
    run: list[Dataset] = []
    for item in reversed(_items(_get(ds, _ORIGINAL))):
        modified = _items(_get(item, _MODIFIED))
        if (
            _text(_get(item, _MODIFYING_SYSTEM)) != policy.modifying_system
            or _text(_get(item, _REASON)) != REASON_COERCE
            or _text(_get(item, _SOURCE_OF_PREVIOUS)) != policy.source_of_previous_values
            or len(modified) != 1
        ):
            break
        run.append(modified[0])
    run.reverse()
    return run


def _baseline(ds: Dataset, local: LocalPatient, policy: ReconcilePolicy) -> tuple[dict[int, Elem], bool]:
    """The values reconciliation starts from, and whether they come from this gateway's earlier reconciliation.

    For an instance already reconciled here to ``local``, each tracked attribute takes its value from
    the oldest of this gateway's items that recorded it (= the value before this gateway first
    touched it); zero-length sequences there were absent.
    """
    base: dict[int, Elem] = {tag: _get(ds, tag) for tag in _TRACKED}
    if _text(_get(ds, _PATIENT_ID)) != local.patient_id or local.issuer not in _issuers(ds):
        return base, False
    restored: set[int] = set()
    for modified in _own_history(ds, policy):
        for tag in _TRACKED:
            if tag in modified and tag not in restored:
                restored.add(tag)
                elem = modified[tag]
                base[tag] = None if elem.VR == "SQ" and not elem.value else copy.deepcopy(elem)
    return base, _PATIENT_ID in restored


# --------------------------------------------------------------------------------------------
# the new values


def _issuer_item(issuer: str) -> Dataset:
    """HL7 v2 HD as DICOM (PS3.3 10.17): Universal Entity ID + ISO for an OID, else Local Namespace Entity ID."""
    item = Dataset()
    if _is_oid(issuer):
        item.add_new(_UNIVERSAL_ID, "UT", issuer)
        item.add_new(_UNIVERSAL_ID_TYPE, "CS", "ISO")
    else:
        item.add_new(_LOCAL_NAMESPACE, "UT", issuer)
    return item


def _sequence(tag: int, items: list[Dataset]) -> DataElement:
    return DataElement(tag, "SQ", Sequence(items))


def _other_ids(base: dict[int, Elem], expected: Expected, local: LocalPatient) -> Elem:
    """Other Patient IDs Sequence with the partner's Patient ID (and issuer) added, if not there yet."""
    remote_id = _text(base[_PATIENT_ID])
    probe = Dataset()
    for tag in (_ISSUER, _QUALIFIERS):
        if (elem := base[tag]) is not None:
            probe[tag] = elem
    issuers = _issuers(probe)
    remote_issuer = issuers[0] if issuers else expected.issuer
    if not remote_id or (remote_id == local.patient_id and remote_issuer == local.issuer):
        return base[_OTHER_IDS]
    items = copy.deepcopy(_items(base[_OTHER_IDS]))
    for item in items:
        known = _issuers(item)
        if _text(_get(item, _PATIENT_ID)) == remote_id and (not remote_issuer or not known or remote_issuer in known):
            return base[_OTHER_IDS]
    item = Dataset()
    item.add_new(_PATIENT_ID, "LO", remote_id)
    if remote_issuer:
        item.add_new(_ISSUER, "LO", remote_issuer)
        if _is_oid(remote_issuer):
            item[_QUALIFIERS] = _sequence(_QUALIFIERS, [_issuer_item(remote_issuer)])
    item.add_new(_TYPE_OF_PATIENT_ID, "CS", "TEXT")
    return _sequence(_OTHER_IDS, [*items, item])


def _coerce_accession(accession: Elem, issuer: Elem, policy: ReconcilePolicy) -> tuple[Elem, Elem]:
    """(Accession Number, Issuer of Accession Number Sequence) after the policy; ``None`` = removed."""
    original = _text(accession)
    if policy.accession == "keep" or (policy.accession == "prefix" and not original):
        return accession, issuer
    if policy.accession == "prefix":
        return DataElement(_ACCESSION, "SH", (policy.accession_prefix + original)[:16].rstrip()), None
    if policy.accession == "clear":
        return DataElement(_ACCESSION, "SH", ""), None
    local_issuer = policy.local_accession_issuer
    return (
        DataElement(_ACCESSION, "SH", policy.local_accession),
        _sequence(_ACCESSION_ISSUER, [_issuer_item(local_issuer)]) if local_issuer else None,
    )


def _coerce_requests(elem: Elem, policy: ReconcilePolicy) -> Elem:
    """A request sequence whose items' accession numbers follow the same policy as the top-level one."""
    if elem is None or policy.accession == "keep":
        return elem
    items = copy.deepcopy(_items(elem))
    for item in items:
        if _ACCESSION not in item and _ACCESSION_ISSUER not in item:
            continue
        accession, issuer = _coerce_accession(_get(item, _ACCESSION), _get(item, _ACCESSION_ISSUER), policy)
        for tag, new in ((_ACCESSION, accession), (_ACCESSION_ISSUER, issuer)):
            if new is None:
                if tag in item:
                    del item[tag]
            else:
                item[tag] = new
    return _sequence(elem.tag, items)


def _description(elem: Elem, policy: ReconcilePolicy) -> Elem:
    if not policy.outside_marker:
        return elem
    marker = policy.outside_marker_text
    description = _text(elem)
    if description == marker or description.endswith(" " + marker):
        return elem
    room = 64 - len(marker) - 1
    clipped = description[:room].rstrip()
    return DataElement(_STUDY_DESCRIPTION, "LO", f"{clipped} {marker}" if clipped else marker)


def _targets(
    base: dict[int, Elem], local: LocalPatient, expected: Expected, policy: ReconcilePolicy
) -> dict[int, Elem]:
    targets = dict(base)
    targets[_PATIENT_NAME] = DataElement(_PATIENT_NAME, "PN", local.name)
    targets[_PATIENT_ID] = DataElement(_PATIENT_ID, "LO", local.patient_id)
    targets[_ISSUER] = DataElement(_ISSUER, "LO", local.issuer)
    targets[_QUALIFIERS] = _sequence(_QUALIFIERS, [_issuer_item(local.issuer)]) if _is_oid(local.issuer) else None
    targets[_BIRTH_DATE] = DataElement(_BIRTH_DATE, "DA", local.birth_date)
    targets[_SEX] = DataElement(_SEX, "CS", local.sex)
    if policy.keep_other_ids:
        targets[_OTHER_IDS] = _other_ids(base, expected, local)
    targets[_ACCESSION], targets[_ACCESSION_ISSUER] = _coerce_accession(
        base[_ACCESSION], base[_ACCESSION_ISSUER], policy
    )
    targets[_REQUEST_ATTRIBUTES] = _coerce_requests(base[_REQUEST_ATTRIBUTES], policy)
    targets[_REFERENCED_REQUEST] = _coerce_requests(base[_REFERENCED_REQUEST], policy)
    targets[_STUDY_DESCRIPTION] = _description(base[_STUDY_DESCRIPTION], policy)
    return targets


# --------------------------------------------------------------------------------------------
# character set


def _texts(elem: DataElement) -> Iterator[str]:
    if elem.VR == "SQ":
        for item in _items(elem):
            for child in item.values():
                if isinstance(child, DataElement):
                    yield from _texts(child)
    elif elem.VR in _TEXT_VRS and elem.value is not None and not isinstance(elem.value, bytes):
        yield str(elem.value)


def _encodable(texts: Iterable[str], charset: list[str]) -> bool:
    """Whether every text can be written in the instance's character set without loss."""
    pending = [t for t in texts if not t.isascii()]
    if not pending:
        return True
    if len(charset) != 1 or charset[0].upper().startswith("ISO 2022") or not charset[0]:
        return False  # default repertoire (ASCII) or code extensions: switch to UTF-8
    try:
        codec = convert_encodings(charset)[0]
        for text in pending:
            text.encode(codec)
    except (LookupError, UnicodeError):
        return False
    return True


def _charset_terms(ds: Dataset) -> list[str]:
    elem = _get(ds, _CHARSET)
    if elem is None or elem.value is None:
        return []
    values = elem.value if isinstance(elem.value, MultiValue | list | tuple) else [elem.value]
    return [str(v).strip() for v in values]


def _switch_to_utf8(ds: Dataset) -> None:
    """Decode every text value with the current character set, then declare UTF-8 (written re-encoded)."""
    for _elem in ds.iterall():  # converts every raw element, nested ones included
        pass
    ds.add_new(_CHARSET, "CS", "ISO_IR 192")


# --------------------------------------------------------------------------------------------
# reconciliation


def _datetime(now: datetime) -> str:
    """DT (PS3.5 6.2): YYYYMMDDHHMMSS.FFFFFF, with &ZZXX when ``now`` knows its offset."""
    return now.strftime("%Y%m%d%H%M%S.%f") + now.strftime("%z")


def _uid(ds: Dataset, tag: int, name: str) -> str:
    value = _text(_get(ds, tag))
    if not value:
        raise ReconcileError(f"the object has no {name}")
    return value


def reconcile_dataset(ds: Dataset, local: LocalPatient, expected: Expected, policy: ReconcilePolicy, *,
                      now: datetime | None = None) -> bool:
    """Check and reconcile ``ds`` in place; ``True`` when something changed (and one history item was added).

    Raises :class:`ReconcileError` (``ds`` untouched) when the instance is refused by :func:`check`.
    """
    _uid(ds, 0x00080018, "SOP Instance UID")
    base, reconciled_before = _baseline(ds, local, policy)
    view = Dataset()
    for tag in (0x00080018, 0x0020000D):
        view[tag] = ds[tag] if tag in ds else DataElement(tag, "UI", "")
    for tag in (_PATIENT_ID, _ISSUER, _QUALIFIERS):
        if (elem := base[tag]) is not None:
            view[tag] = elem
    try:
        check(view, expected)
    except ReconcileError as exc:
        if reconciled_before:
            raise ReconcileError(
                f"{exc} (original patient as recorded by {policy.modifying_system} in its Original Attributes)"
            ) from None
        raise
    targets = _targets(base, local, expected, policy)
    changes = {tag: new for tag, new in targets.items() if not _same(_get(ds, tag), new)}
    if not changes:
        return False

    modified = Dataset()
    news = [e for e in changes.values() if e is not None]
    history_texts = [policy.modifying_system, policy.source_of_previous_values]
    charset = _charset_terms(ds)
    if not _encodable([t for e in news for t in _texts(e)] + history_texts, charset):
        _switch_to_utf8(ds)
        # the previous character set goes with the previous values: it is the character set of the item
        modified.add_new(_CHARSET, "CS", charset if len(charset) > 1 else (charset[0] if charset else None))
    for tag, new in changes.items():
        old = _get(ds, tag)
        modified[tag] = copy.deepcopy(old) if old is not None else DataElement(tag, dictionary_VR(tag), None)
        if new is None:
            del ds[tag]
        else:
            ds[tag] = new

    item = Dataset()
    item.add_new(_MODIFIED, "SQ", Sequence([modified]))
    item.add_new(_MODIFICATION_DATETIME, "DT", _datetime(now or datetime.now().astimezone()))
    item.add_new(_MODIFYING_SYSTEM, "LO", policy.modifying_system)
    item.add_new(_SOURCE_OF_PREVIOUS, "LO", policy.source_of_previous_values)
    item.add_new(_REASON, "CS", REASON_COERCE)
    history = _get(ds, _ORIGINAL)
    ds[_ORIGINAL] = _sequence(_ORIGINAL, [*_items(history), item])

    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        if _SOURCE_AE_TITLE in meta:
            del meta[_SOURCE_AE_TITLE]
    return True


_PARSE_ERRORS = (ValueError, KeyError, IndexError, EOFError, TypeError, AttributeError, NotImplementedError)


def _read(data: bytes) -> FileDataset:
    try:
        ds = dcmread(io.BytesIO(data))
    except InvalidDicomError as exc:
        raise ReconcileError(f"not a DICOM Part 10 object: {exc}") from exc
    except (*_PARSE_ERRORS, OSError) as exc:
        raise ReconcileError(f"unreadable DICOM object: {exc}") from exc
    if "TransferSyntaxUID" not in ds.file_meta:
        raise ReconcileError("the DICOM object has no Transfer Syntax UID in its File Meta Information")
    return ds


def _apply(ds: FileDataset, local: LocalPatient, expected: Expected, policy: ReconcilePolicy,
           now: datetime | None) -> bool:
    try:
        return reconcile_dataset(ds, local, expected, policy, now=now)
    except ReconcileError:
        raise
    except _PARSE_ERRORS as exc:  # a damaged element deep in a sequence surfaces only when parsed
        raise ReconcileError(f"malformed DICOM object: {exc}") from exc


def _write(ds: FileDataset, out: BinaryIO) -> None:
    try:
        dcmwrite(out, ds, enforce_file_format=True)
    except _PARSE_ERRORS as exc:
        raise ReconcileError(f"cannot encode the reconciled object: {exc}") from exc


def reconcile(data: bytes, local: LocalPatient, expected: Expected, policy: ReconcilePolicy, *,
              now: datetime | None = None) -> bytes:
    """Reconcile one Part 10 object (image, KOS, any composite instance) and return it as Part 10 bytes.

    Same transfer syntax, same UIDs, pixel data byte-identical; ``data`` itself when nothing needed
    to change (e.g. an instance already reconciled with the same policy). ``now`` pins Attribute
    Modification DateTime (with it, the output is a pure function of the input).
    """
    ds = _read(data)
    if not _apply(ds, local, expected, policy, now):
        return data
    out = io.BytesIO()
    _write(ds, out)
    return out.getvalue()


def reconcile_file(src: Path | str, dest: Path | str, local: LocalPatient, expected: Expected,
                   policy: ReconcilePolicy, *, now: datetime | None = None) -> bool:
    """Reconcile the Part 10 file ``src`` into ``dest`` (may be the same path); ``True`` when values changed.

    ``dest`` is replaced atomically: the object is written to a temporary file beside it, flushed
    and fsync'ed, then renamed over ``dest`` (and the directory fsync'ed). On any failure —
    refusal, unreadable input, a full disk, a failed rename — the temporary file is removed and
    ``dest`` is left as it was. Refusals and bad input raise :class:`ReconcileError`; I/O failures
    their ``OSError``.
    """
    src, dest = Path(src), Path(dest)
    data = src.read_bytes()
    ds = _read(data)
    changed = _apply(ds, local, expected, policy, now)
    with atomic_write(dest) as fh:
        if changed:
            _write(ds, fh)
        else:
            fh.write(data)
    return changed


def reconcile_kos(data: bytes, local: LocalPatient, expected: Expected, policy: ReconcilePolicy, *,
                  now: datetime | None = None) -> tuple[bytes, KosManifest]:
    """Reconcile a Key Object Selection manifest like any instance; return it with its re-parsed content.

    The KOS must parse before (:func:`~gateway.dicom.kos.parse_kos`), and afterwards still reference
    exactly the same instances at the same locations; the returned manifest shows the local patient.
    """
    try:
        before = parse_kos(data)
    except KosError as exc:
        raise ReconcileError(f"not a usable KOS: {exc}") from exc
    out = reconcile(data, local, expected, policy, now=now)
    try:
        after = parse_kos(out)
    except KosError as exc:  # pragma: no cover - reconcile writes only patient/study attributes
        raise ReconcileError(f"the reconciled KOS no longer parses: {exc}") from exc
    if after.references != before.references:  # pragma: no cover - same reason
        raise ReconcileError("reconciliation changed the references of the KOS")
    return out, after
