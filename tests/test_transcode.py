"""Transfer-syntax choice and conversion: decision table, pixel-exact lossless matrix, clear failures."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID

from gateway.dicom import transcode as tc
from gateway.dicom.transcode import (
    Decision,
    TranscodeError,
    can_decode,
    can_encode,
    choose_syntax,
    convert_for,
    transcode,
)

EVRLE = tc.EXPLICIT_VR_LITTLE_ENDIAN
IVRLE = tc.IMPLICIT_VR_LITTLE_ENDIAN
DEFL = tc.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN
EVRBE = tc.EXPLICIT_VR_BIG_ENDIAN
RLE = tc.RLE_LOSSLESS
JLS = tc.JPEG_LS_LOSSLESS
J2K = tc.JPEG_2000_LOSSLESS
JPEG_SV1 = tc.JPEG_LOSSLESS_SV1
JPEG_P14 = tc.JPEG_LOSSLESS
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JLS_NEAR = "1.2.840.10008.1.2.4.81"
J2K_LOSSY = "1.2.840.10008.1.2.4.91"
JPIP = "1.2.840.10008.1.2.4.94"
JPIP_DEFLATE = "1.2.840.10008.1.2.4.95"
MPEG2 = "1.2.840.10008.1.2.4.100"
HEVC = "1.2.840.10008.1.2.4.107"
HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
SC = "1.2.840.10008.5.1.4.1.1.7"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"

LOSSLESS_TARGETS = [EVRLE, IVRLE, DEFL, RLE, JLS, J2K, JPEG_SV1, JPEG_P14]


def _image(kind: str, *, seed: int = 7) -> tuple[Dataset, np.ndarray]:
    """A minimal Secondary Capture dataset (Explicit VR LE) and its expected pixel array."""
    rng = np.random.default_rng(seed)
    arr: np.ndarray
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(EVRLE)
    ds.SOPClassUID = SC
    ds.SOPInstanceUID = f"1.2.3.4.{seed}.{abs(hash(kind)) % 10000}"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "P1"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 0
    if kind == "u8":
        arr = rng.integers(0, 256, (48, 40), dtype=np.uint8)
        bits = (8, 8)
    elif kind == "u12-multiframe":
        # smooth gradient + noise: realistic enough for the codecs, exercises multi-frame fragments
        base = np.add.outer(np.arange(40), np.arange(36)) * 40
        arr = np.stack([(base + rng.integers(0, 60, base.shape) + f * 500) % 4096 for f in range(3)]).astype("<u2")
        ds.NumberOfFrames = 3
        bits = (16, 12)
    elif kind == "s16":
        arr = rng.integers(-32768, 32768, (36, 44), dtype="<i2")
        ds.PixelRepresentation = 1
        bits = (16, 16)
    elif kind == "rgb":
        arr = rng.integers(0, 256, (34, 46, 3), dtype=np.uint8)
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        bits = (8, 8)
    else:
        raise AssertionError(kind)
    ds.BitsAllocated, ds.BitsStored = bits
    ds.HighBit = bits[1] - 1
    shape = arr.shape[1:] if arr.ndim == 3 and kind != "rgb" else arr.shape
    ds.Rows, ds.Columns = shape[0], shape[1]
    ds.PixelData = arr.tobytes()
    return ds, arr


def _part10(ds: Dataset, *, big_endian: bool = False) -> bytes:
    buf = io.BytesIO()
    if big_endian:
        ds.file_meta.TransferSyntaxUID = UID(EVRBE)
        arr = np.frombuffer(ds.PixelData, dtype=f"<u{ds.BitsAllocated // 8}")
        ds.PixelData = arr.astype(f">u{ds.BitsAllocated // 8}").tobytes()
        pydicom.dcmwrite(buf, ds, implicit_vr=False, little_endian=False, enforce_file_format=True)
    else:
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _read(data: bytes) -> pydicom.FileDataset:
    return pydicom.dcmread(io.BytesIO(data))


def _pixels(data: bytes) -> np.ndarray:
    return _read(data).pixel_array


def _in(kind: str, ts: str) -> tuple[bytes, np.ndarray]:
    ds, arr = _image(kind)
    data = _part10(ds)
    return (data if ts == EVRLE else transcode(data, ts)), arr


# ---------------------------------------------------------------------------- capabilities


def test_capabilities_reflect_installed_codecs_and_policy() -> None:
    for ts in LOSSLESS_TARGETS:
        assert can_encode(ts), ts
        assert can_decode(ts), ts
    for ts in (JPEG_BASELINE, JPEG_EXTENDED, JLS_NEAR, J2K_LOSSY, HTJ2K_LOSSLESS, EVRBE):
        assert can_decode(ts), ts
    for ts in (JPEG_BASELINE, JPEG_EXTENDED, JLS_NEAR, J2K_LOSSY, EVRBE, JPIP, JPIP_DEFLATE, MPEG2, HEVC, "1.2.3"):
        assert not can_encode(ts), ts
    for ts in (JPIP, JPIP_DEFLATE, MPEG2, HEVC, "1.2.3"):
        assert not can_decode(ts), ts


# ---------------------------------------------------------------------------- decisions


@pytest.mark.parametrize(
    ("stored", "accepted", "expected"),
    [
        (J2K, [J2K], Decision.as_is(J2K)),
        (J2K, [EVRLE, J2K], Decision.as_is(J2K)),
        (JPEG_BASELINE, [JPEG_BASELINE, EVRLE], Decision.as_is(JPEG_BASELINE)),  # lossy stored, consumer takes it
        (MPEG2, [MPEG2], Decision.as_is(MPEG2)),
        (J2K, [IVRLE, EVRLE], Decision.convert(EVRLE, [IVRLE])),
        (J2K, [IVRLE], Decision.convert(IVRLE)),
        (EVRLE, [JPEG_SV1, RLE, JLS], Decision.convert(JLS, [JPEG_SV1, RLE])),
        (EVRBE, [EVRLE], Decision.convert(EVRLE)),
        (JPEG_BASELINE, [EVRLE], Decision.convert(EVRLE)),  # decoding lossy data adds no loss
        (EVRLE, [JPEG_BASELINE, RLE], Decision.convert(RLE)),  # never produce lossy
        (EVRLE, [DEFL, IVRLE], Decision.convert(IVRLE, [DEFL])),
        (EVRLE, [" 1.2.840.10008.1.2\x00"], Decision.convert(IVRLE)),  # padded UID from the wire
    ],
)
def test_choose_syntax_table(stored: str, accepted: list[str], expected: Decision) -> None:
    assert choose_syntax(stored, accepted) == expected


@pytest.mark.parametrize(
    ("stored", "accepted", "fragments"),
    [
        (EVRLE, [JPEG_BASELINE, J2K_LOSSY], ["never produces lossy compression", "JPEG Baseline"]),
        (EVRLE, [JPIP], ["JPIP"]),
        (EVRLE, [EVRBE], ["Big Endian"]),
        (EVRLE, ["1.2.3.4"], ["1.2.3.4", "not a transfer syntax XIG knows"]),
        (EVRLE, [], ["lists no transfer syntax"]),
        (JPIP, [EVRLE], ["JPIP", "only referenced"]),
        (MPEG2, [EVRLE], ["MPEG2", "video"]),
        (J2K, [JPEG_BASELINE], ["cannot convert JPEG 2000", "JPEG Baseline", "never produces lossy"]),
    ],
)
def test_impossible_conversions_say_why(stored: str, accepted: list[str], fragments: list[str]) -> None:
    decision = choose_syntax(stored, accepted)
    assert decision.action == "impossible" and not decision.possible and decision.target is None
    for fragment in fragments:
        assert fragment in decision.reason


def test_object_without_pixel_data_may_take_any_little_endian_syntax() -> None:
    assert choose_syntax(EVRLE, [JPEG_BASELINE]).action == "impossible"
    assert choose_syntax(EVRLE, [JPEG_BASELINE], has_pixel_data=False) == Decision.convert(JPEG_BASELINE)
    assert choose_syntax(EVRLE, [JPIP], has_pixel_data=False).action == "impossible"
    sr = Dataset()
    sr.file_meta = FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = UID(EVRLE)
    sr.SOPClassUID = BASIC_TEXT_SR
    sr.SOPInstanceUID = "1.2.3.77"
    sr.PatientName = "Doe^Jane"
    ts, out = convert_for(_part10(sr), EVRLE, [JPEG_BASELINE])
    back = _read(out)
    assert ts == JPEG_BASELINE == back.file_meta.TransferSyntaxUID
    assert (back.SOPInstanceUID, str(back.PatientName)) == ("1.2.3.77", "Doe^Jane")


# ---------------------------------------------------------------------------- the lossless matrix


@pytest.mark.parametrize("kind", ["u12-multiframe", "rgb"])
@pytest.mark.parametrize("source", LOSSLESS_TARGETS)
@pytest.mark.parametrize("target", LOSSLESS_TARGETS)
def test_lossless_matrix_is_pixel_exact(kind: str, source: str, target: str) -> None:
    data, arr = _in(kind, source)
    assert _read(data).file_meta.TransferSyntaxUID == source
    out = transcode(data, target)
    if source == target:
        assert out is data
    back = _read(out)
    assert back.file_meta.TransferSyntaxUID == target
    assert back.SOPInstanceUID == _read(data).SOPInstanceUID  # same instance: RAD-75 DocumentUniqueId
    assert str(back.PatientName) == "Doe^Jane"
    assert np.array_equal(back.pixel_array, arr)
    assert np.array_equal(_pixels(transcode(out, EVRLE)), arr)


@pytest.mark.parametrize("kind", ["u8", "s16"])
@pytest.mark.parametrize("target", [RLE, JLS, J2K, JPEG_SV1, IVRLE])
def test_other_pixel_formats_round_trip(kind: str, target: str) -> None:
    ds, arr = _image(kind)
    out = transcode(_part10(ds), target)
    assert np.array_equal(_pixels(out), arr)
    assert np.array_equal(_pixels(transcode(out, EVRLE)), arr)


@pytest.mark.parametrize(
    "arr",
    [
        np.array([[200]], dtype=np.uint8),
        np.full((9, 7), 1234, dtype="<u2"),
        np.array([[0, 65535, 0, 65535], [65535, 0, 32768, 1]], dtype="<u2"),  # difference category 16
    ],
    ids=["1x1", "constant", "extremes"],
)
def test_jpeg_lossless_encoder_edge_cases(arr: np.ndarray) -> None:
    """XIG's own Process 14 SV1 encoder, checked by an independent decoder (libjpeg via pylibjpeg)."""
    ds, _ = _image("u8")
    ds.BitsAllocated = ds.BitsStored = arr.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.Rows, ds.Columns = arr.shape
    ds.PixelData = arr.tobytes()
    out = transcode(_part10(ds), JPEG_SV1)
    assert np.array_equal(_pixels(out), arr)


def test_big_endian_source_is_decoded() -> None:
    for kind in ("u12-multiframe", "u8", "rgb"):
        ds, arr = _image(kind)
        data = _part10(ds, big_endian=True)
        assert _read(data).file_meta.TransferSyntaxUID == EVRBE
        for target in (EVRLE, IVRLE, JLS):
            assert np.array_equal(_pixels(transcode(data, target)), arr), (kind, target)


def test_big_endian_reference_files_from_pydicom() -> None:
    """pydicom ships the same MR / RT Dose images in both byte orders: an independent oracle."""
    for big, little in (("MR_small_bigendian.dcm", "MR_small.dcm"), ("rtdose_expb.dcm", "rtdose.dcm")):
        big_path, little_path = get_testdata_file(big), get_testdata_file(little)
        assert big_path is not None and little_path is not None
        with open(big_path, "rb") as fh:
            out = transcode(fh.read(), EVRLE)
        expected = pydicom.dcmread(little_path)
        got = _read(out)
        assert np.array_equal(got.pixel_array, expected.pixel_array)
        assert got.Rows == expected.Rows and got.SOPInstanceUID == expected.SOPInstanceUID


def test_lossy_source_is_decompressed_and_stays_marked_lossy() -> None:
    path = get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")
    assert path is not None
    with open(path, "rb") as fh:
        data = fh.read()
    original = pydicom.dcmread(path)
    assert original.file_meta.TransferSyntaxUID == JPEG_BASELINE
    ts, out = convert_for(data, JPEG_BASELINE, [EVRLE])
    back = _read(out)
    assert ts == EVRLE and back.file_meta.TransferSyntaxUID == EVRLE
    assert back.LossyImageCompression == "01"
    assert back.SOPInstanceUID == original.SOPInstanceUID
    assert back.pixel_array.shape == original.pixel_array.shape
    assert np.array_equal(back.pixel_array, original.pixel_array)  # the same decoded pixels, nothing more lost


# ---------------------------------------------------------------------------- failures and fallbacks


def test_encoder_refusal_names_both_syntaxes_and_the_cause() -> None:
    ds, arr = _image("u8")
    small = arr[:16, :16].copy()
    ds.Rows, ds.Columns = small.shape
    ds.PixelData = small.tobytes()
    data = _part10(ds)
    with pytest.raises(TranscodeError, match=r"cannot convert Explicit VR Little Endian .* to JPEG 2000 .*Lossless"):
        transcode(data, J2K)
    # convert_for falls back to the next acceptable syntax
    ts, out = convert_for(data, EVRLE, [J2K, RLE])
    assert ts == RLE
    assert np.array_equal(_pixels(out), small)


def test_32_bit_pixels_cannot_go_to_jpeg_ls_but_fall_back() -> None:
    path = get_testdata_file("rtdose.dcm")
    assert path is not None
    with open(path, "rb") as fh:
        data = fh.read()
    with pytest.raises(TranscodeError, match="JPEG-LS Lossless"):
        transcode(data, JLS)
    with pytest.raises(TranscodeError, match="JPEG Lossless takes 2 to 16 bits"):
        transcode(data, JPEG_SV1)
    with pytest.raises(TranscodeError) as info:
        convert_for(data, EVRLE, [JLS, JPEG_SV1])
    assert "JPEG-LS" in str(info.value) and "JPEG Lossless" in str(info.value)


def test_policy_refusals_in_transcode() -> None:
    ds, _ = _image("u8")
    data = _part10(ds)
    with pytest.raises(TranscodeError, match="never produces lossy"):
        transcode(data, JPEG_BASELINE)
    with pytest.raises(TranscodeError, match="Big Endian"):
        transcode(data, EVRBE)
    with pytest.raises(TranscodeError, match="JPIP"):
        transcode(data, JPIP)
    with pytest.raises(TranscodeError, match="not a DICOM Part 10"):
        transcode(b"\x00" * 64, EVRLE)


def test_float_pixel_data_stays_native() -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(EVRLE)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.30"
    ds.SOPInstanceUID = "1.2.3.5"
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 32
    ds.FloatPixelData = np.linspace(0, 1, 16, dtype="<f4").tobytes()
    data = _part10(ds)
    assert choose_syntax(EVRLE, [IVRLE]) == Decision.convert(IVRLE)
    assert _read(transcode(data, IVRLE)).FloatPixelData == ds.FloatPixelData
    with pytest.raises(TranscodeError, match="Float"):
        transcode(data, RLE)
