"""Synthetic but realistic DICOM studies for tests, demos and benchmarks (pydicom only, no numpy).

:func:`make_study` writes one Part 10 file per instance — Patient, General Study, General Series,
Frame of Reference, General Equipment, General/Image Plane/Image Pixel and SOP Common modules,
with the modality's storage SOP class — and returns the UIDs and paths (:class:`SyntheticStudy`).
Files are written one at a time; the study is never held in memory, so a benchmark can make
400 × 512×512×16-bit CT (≈ 200 MB) cheaply.

Everything is deterministic: the same arguments (``seed`` included) give byte-identical files.
UIDs live under ``2.25`` (UUID-derived, ITU-T X.667) and are hashed from the seed together with
the patient ID, study date/description and accession number, so two studies made with the same
seed for different patients still get different UIDs. Pixel data is a phantom (an ellipse "body"
with a brighter "organ" whose size changes from slice to slice) plus seeded noise: plausible to a
viewer, and different in every instance so that a pixel hash identifies an instance.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

__all__ = [
    "IMPLEMENTATION_CLASS_UID", "SOP_CLASS_BY_MODALITY", "SUPPORTED_TRANSFER_SYNTAXES", "SyntheticInstance",
    "SyntheticSeries", "SyntheticStudy", "derive_uid", "iter_files", "make_instance", "make_study",
]

#: Implementation Class UID written into the File Meta (fixed, so files do not depend on pydicom's version).
IMPLEMENTATION_CLASS_UID = "2.25.214586731289571233309376311478562090013"
IMPLEMENTATION_VERSION_NAME = "XIG_SYNTH_1"

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
#: Storage SOP class per modality (PS3.4 B.5); anything else is Secondary Capture.
SOP_CLASS_BY_MODALITY: dict[str, str] = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "MG": "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography X-Ray Image Storage - For Presentation
    "US": "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
    "XA": "1.2.840.10008.5.1.4.1.1.12.1",  # X-Ray Angiographic Image Storage
    "NM": "1.2.840.10008.5.1.4.1.1.20",  # Nuclear Medicine Image Storage
    "PT": "1.2.840.10008.5.1.4.1.1.128",  # Positron Emission Tomography Image Storage
    "OT": SECONDARY_CAPTURE,
}

#: Uncompressed transfer syntaxes pydicom can write without an image codec.
SUPPORTED_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)

_CROSS_SECTIONAL = {"CT", "MR", "PT", "NM"}


@dataclass(frozen=True)
class SyntheticInstance:
    path: Path
    StudyInstanceUID: str
    SeriesInstanceUID: str
    SOPInstanceUID: str
    SOPClassUID: str
    TransferSyntaxUID: str
    InstanceNumber: int
    #: SHA-256 of the Pixel Data value as written
    pixel_sha256: str
    #: size of the file in bytes
    size: int


@dataclass(frozen=True)
class SyntheticSeries:
    SeriesInstanceUID: str
    Modality: str
    SeriesNumber: int
    SeriesDescription: str
    BodyPartExamined: str
    instances: tuple[SyntheticInstance, ...]


@dataclass(frozen=True)
class SyntheticStudy:
    StudyInstanceUID: str
    PatientID: str
    IssuerOfPatientID: str | None
    PatientName: str
    PatientBirthDate: str
    PatientSex: str
    AccessionNumber: str
    StudyDate: str
    StudyDescription: str
    series: tuple[SyntheticSeries, ...]

    @property
    def instances(self) -> list[SyntheticInstance]:
        return [i for s in self.series for i in s.instances]

    @property
    def paths(self) -> list[Path]:
        return [i.path for i in self.instances]

    @property
    def total_bytes(self) -> int:
        return sum(i.size for i in self.instances)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.Modality for s in self.series))


def derive_uid(*parts: object) -> str:
    """A deterministic ``2.25.<decimal>`` UID (at most 64 characters) from ``parts``."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def _seed_int(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()[:8], "big")


# -------------------------------------------------------------------------------------------------
# Pixel data
# -------------------------------------------------------------------------------------------------

class _Phantom:
    """Builds slices of an elliptical phantom with seeded noise using big-int arithmetic (fast, no numpy)."""

    def __init__(self, rows: int, cols: int, bits: int) -> None:
        if bits not in (8, 16):
            raise ValueError("bits must be 8 or 16")
        if rows < 2 or cols < 2:
            raise ValueError("rows and cols must be at least 2")
        self.rows, self.cols, self.bits = rows, cols, bits
        self.bpp = bits // 8
        self.size = rows * cols * self.bpp
        # noise lives in the low bits, the phantom's levels are multiples of the noise range
        if bits == 16:
            self.noise_mask = int.from_bytes(b"\x3f\x00" * (rows * cols), "little")
            self.levels = (0, 1024, 1344)  # air, soft tissue (CT 0 HU with intercept -1024), organ
        else:
            self.noise_mask = int.from_bytes(b"\x0f" * (rows * cols), "little")
            self.levels = (0, 96, 176)
        self.px = tuple(v.to_bytes(self.bpp, "little") for v in self.levels)

    def _span(self, centre: float, half: float, limit: int) -> tuple[int, int]:
        lo = max(0, min(limit, round(centre - half)))
        hi = max(lo, min(limit, round(centre + half)))
        return lo, hi

    def slice(self, position: float, rng: random.Random) -> bytes:
        """Pixel Data of one slice; ``position`` in [0, 1] shapes the phantom."""
        rows, cols = self.rows, self.cols
        air, body, organ = self.px
        cx, cy = cols / 2.0, rows / 2.0
        a = 0.42 * cols * (0.85 + 0.15 * math.sin(math.pi * position))
        b = 0.34 * rows * (0.85 + 0.15 * math.sin(math.pi * position))
        r = max(1.0, 0.14 * min(rows, cols) * (0.3 + 0.7 * math.sin(math.pi * position)))
        ox = cx + 0.12 * cols * (position - 0.5)
        out: list[bytes] = []
        for y in range(rows):
            dy = (y + 0.5 - cy) / b
            if abs(dy) >= 1.0:
                out.append(air * cols)
                continue
            x0, x1 = self._span(cx, a * math.sqrt(1.0 - dy * dy), cols)
            ddy = (y + 0.5 - cy) / r
            if abs(ddy) < 1.0:
                c0, c1 = self._span(ox, r * math.sqrt(1.0 - ddy * ddy), cols)
                c0, c1 = max(c0, x0), max(min(c1, x1), max(c0, x0))
            else:
                c0 = c1 = x0
            out.append(air * x0 + body * (c0 - x0) + organ * (c1 - c0) + body * (x1 - c1) + air * (cols - x1))
        base = int.from_bytes(b"".join(out), "little")
        noise = int.from_bytes(rng.randbytes(self.size), "little") & self.noise_mask
        return (base | noise).to_bytes(self.size, "little")


# -------------------------------------------------------------------------------------------------
# Datasets
# -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Context:
    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    issuer: str | None
    accession: str
    accession_issuer: str | None
    study_uid: str
    study_date: str
    study_time: str
    study_description: str
    study_id: str
    referring_physician: str
    frame_of_reference_uid: str


def _check_transfer_syntax(ts: str) -> UID:
    uid = UID(ts)
    if uid not in SUPPORTED_TRANSFER_SYNTAXES:
        raise ValueError(f"transfer syntax {ts} is not supported by the synthesizer "
                         f"(use one of {', '.join(SUPPORTED_TRANSFER_SYNTAXES)})")
    return uid


def _build_dataset(ctx: _Context, *, series_uid: str, sop_uid: str, sop_class: str, modality: str,
                   series_number: int, series_description: str, body_part: str, instance_number: int,
                   n_in_series: int, rows: int, cols: int, bits: int, pixel_data: bytes,
                   transfer_syntax: UID) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    # SOP Common
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = ctx.study_date
    ds.InstanceCreationTime = ctx.study_time
    # General Image
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if modality in _CROSS_SECTIONAL else ["ORIGINAL", "PRIMARY"]
    ds.StudyDate = ctx.study_date
    ds.SeriesDate = ctx.study_date
    ds.ContentDate = ctx.study_date
    ds.StudyTime = ctx.study_time
    ds.SeriesTime = ctx.study_time
    ds.ContentTime = ctx.study_time
    ds.AccessionNumber = ctx.accession
    if ctx.accession_issuer:
        issuer = Dataset()
        issuer.UniversalEntityID = ctx.accession_issuer
        issuer.UniversalEntityIDType = "ISO"
        ds.IssuerOfAccessionNumberSequence = [issuer]
    ds.Modality = modality
    ds.Manufacturer = "XIG synthetic"
    ds.InstitutionName = "XIG Test Hospital"
    ds.ReferringPhysicianName = ctx.referring_physician
    ds.StationName = "SYNTH01"
    ds.StudyDescription = ctx.study_description
    ds.SeriesDescription = series_description
    ds.ManufacturerModelName = "Phantom"
    # Patient
    ds.PatientName = ctx.patient_name
    ds.PatientID = ctx.patient_id
    if ctx.issuer:
        ds.IssuerOfPatientID = ctx.issuer
    ds.PatientBirthDate = ctx.birth_date
    ds.PatientSex = ctx.sex
    ds.BodyPartExamined = body_part
    # modality specifics
    thickness = 1.25
    if modality == "CT":
        ds.KVP = "120"
        ds.ConvolutionKernel = "STANDARD"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
    elif modality == "MR":
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = "500"
        ds.EchoTime = "15"
        ds.EchoTrainLength = 1
        ds.MagneticFieldStrength = "1.5"
        thickness = 5.0
    elif modality in ("CR", "DX", "MG"):
        ds.ViewPosition = "PA"
        ds.ImagerPixelSpacing = ["0.2", "0.2"]
    # General Series / Study
    ds.StudyInstanceUID = ctx.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = ctx.study_id
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.ImagesInAcquisition = n_in_series
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = "" if modality in _CROSS_SECTIONAL else ["L", "F"]
    if modality in _CROSS_SECTIONAL:
        # Frame of Reference + Image Plane
        ds.SliceThickness = f"{thickness:g}"
        ds.ImagePositionPatient = ["-160", "-160", f"{-(instance_number - 1) * thickness:g}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID = ctx.frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{-(instance_number - 1) * thickness:g}"
        ds.PixelSpacing = [f"{320 / cols:.6g}", f"{320 / rows:.6g}"]
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = bits
    ds.BitsStored = 12 if bits == 16 else 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if bits == 16:
        ds.WindowCenter = "40" if modality == "CT" else "1200"
        ds.WindowWidth = "400" if modality == "CT" else "800"
    ds.LossyImageCompression = "00"
    ds.PixelData = pixel_data
    ds["PixelData"].VR = "OW" if bits == 16 else "OB"
    return ds


def _write(ds: Dataset, path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    dcmwrite(tmp, ds, enforce_file_format=True)
    tmp.replace(path)
    return path.stat().st_size


def make_study(out_dir: Path | str, *, patient_id: str, patient_name: str, birth_date: str, sex: str,
               issuer: str | None = None, accession: str = "", accession_issuer: str | None = None,
               study_uid: str | None = None, study_date: str = "20240115", study_time: str = "101500",
               study_description: str = "", study_id: str = "1", referring_physician: str = "Referrer^Rita",
               series: Sequence[tuple[str, int, str]] = (("CT", 3, "CHEST"),), rows: int = 64, cols: int = 64,
               bits: int = 16, transfer_syntax: str = ExplicitVRLittleEndian, seed: int | str = 0,
               ) -> SyntheticStudy:
    """Write a study under ``out_dir`` (``s<series number>/i<instance number>.dcm``) and describe it.

    ``series`` lists ``(modality, number of instances, body part)``; series are numbered from 1.
    ``bits`` is 8 or 16 (12 bits stored); US series are always 8-bit (the US Image module demands it).
    ``transfer_syntax`` is one of :data:`SUPPORTED_TRANSFER_SYNTAXES`. Files are written one by one
    (temp file + rename).
    """
    ts = _check_transfer_syntax(transfer_syntax)
    out = Path(out_dir)
    key = (seed, patient_id, study_date, study_description, accession)
    ctx = _Context(
        patient_id=patient_id, patient_name=patient_name, birth_date=birth_date, sex=sex, issuer=issuer,
        accession=accession, accession_issuer=accession_issuer,
        study_uid=study_uid or derive_uid("study", *key), study_date=study_date, study_time=study_time,
        study_description=study_description, study_id=study_id, referring_physician=referring_physician,
        frame_of_reference_uid=derive_uid("for", *key))
    phantoms = {b: _Phantom(rows, cols, b) for b in {bits, 8}}
    out_series: list[SyntheticSeries] = []
    for s_index, (modality, count, body_part) in enumerate(series, start=1):
        modality = modality.upper()
        s_bits = 8 if modality == "US" else bits  # the US Image module allows 8 bits for MONOCHROME2 only
        phantom = phantoms[s_bits]
        if count < 1:
            raise ValueError(f"series {s_index}: at least one instance is needed")
        series_uid = derive_uid("series", *key, s_index)
        description = f"{modality} {body_part}".strip() + f" #{s_index}"
        rng = random.Random(_seed_int("pixels", *key, s_index))
        instances: list[SyntheticInstance] = []
        for n in range(1, count + 1):
            sop_uid = derive_uid("instance", *key, s_index, n)
            pixels = phantom.slice((n - 1) / max(1, count - 1), rng)
            path = out / f"s{s_index:03d}" / f"i{n:05d}.dcm"
            instances.append(_write_instance(
                ctx, path, series_uid=series_uid, sop_uid=sop_uid, modality=modality, series_number=s_index,
                series_description=description, body_part=body_part, instance_number=n, n_in_series=count,
                rows=rows, cols=cols, bits=s_bits, pixels=pixels, ts=ts))
            del pixels
        out_series.append(SyntheticSeries(series_uid, modality, s_index, description, body_part, tuple(instances)))
    return SyntheticStudy(
        StudyInstanceUID=ctx.study_uid, PatientID=patient_id, IssuerOfPatientID=issuer, PatientName=patient_name,
        PatientBirthDate=birth_date, PatientSex=sex, AccessionNumber=accession, StudyDate=study_date,
        StudyDescription=study_description, series=tuple(out_series))


def _write_instance(ctx: _Context, path: Path, *, series_uid: str, sop_uid: str, modality: str,
                    series_number: int, series_description: str, body_part: str, instance_number: int,
                    n_in_series: int, rows: int, cols: int, bits: int, pixels: bytes, ts: UID) -> SyntheticInstance:
    sop_class = SOP_CLASS_BY_MODALITY.get(modality, SECONDARY_CAPTURE)
    ds = _build_dataset(ctx, series_uid=series_uid, sop_uid=sop_uid, sop_class=sop_class, modality=modality,
                        series_number=series_number, series_description=series_description, body_part=body_part,
                        instance_number=instance_number, n_in_series=n_in_series, rows=rows, cols=cols, bits=bits,
                        pixel_data=pixels, transfer_syntax=ts)
    size = _write(ds, path)
    return SyntheticInstance(path=path, StudyInstanceUID=ctx.study_uid, SeriesInstanceUID=series_uid,
                             SOPInstanceUID=sop_uid, SOPClassUID=sop_class, TransferSyntaxUID=str(ts),
                             InstanceNumber=instance_number, pixel_sha256=hashlib.sha256(pixels).hexdigest(),
                             size=size)


def make_instance(path: Path | str, *, patient_id: str = "SYNTH1", patient_name: str = "Synthetic^Sam",
                  birth_date: str = "19700101", sex: str = "O", issuer: str | None = None, accession: str = "",
                  study_uid: str | None = None, series_uid: str | None = None, sop_uid: str | None = None,
                  study_date: str = "20240115", study_description: str = "", modality: str = "OT",
                  body_part: str = "", series_number: int = 1, instance_number: int = 1, rows: int = 64,
                  cols: int = 64, bits: int = 16, transfer_syntax: str = ExplicitVRLittleEndian,
                  seed: int | str = 0) -> SyntheticInstance:
    """Write one instance to ``path``; UIDs not given are derived from ``seed`` and the other arguments."""
    ts = _check_transfer_syntax(transfer_syntax)
    key = (seed, patient_id, study_date, study_description, accession)
    ctx = _Context(
        patient_id=patient_id, patient_name=patient_name, birth_date=birth_date, sex=sex, issuer=issuer,
        accession=accession, accession_issuer=None, study_uid=study_uid or derive_uid("study", *key),
        study_date=study_date, study_time="101500", study_description=study_description, study_id="1",
        referring_physician="", frame_of_reference_uid=derive_uid("for", *key))
    modality = modality.upper()
    bits = 8 if modality == "US" else bits
    series_uid = series_uid or derive_uid("series", *key, series_number)
    sop_uid = sop_uid or derive_uid("instance", *key, series_number, instance_number)
    rng = random.Random(_seed_int("pixels", *key, series_number, instance_number))
    pixels = _Phantom(rows, cols, bits).slice(0.5, rng)
    return _write_instance(ctx, Path(path), series_uid=series_uid, sop_uid=sop_uid, modality=modality,
                           series_number=series_number, series_description=f"{modality} {body_part}".strip(),
                           body_part=body_part, instance_number=instance_number, n_in_series=1, rows=rows,
                           cols=cols, bits=bits, pixels=pixels, ts=ts)


def iter_files(study: SyntheticStudy) -> Iterable[Path]:
    """The study's files in series/instance order."""
    for s in study.series:
        for i in s.instances:
            yield i.path
