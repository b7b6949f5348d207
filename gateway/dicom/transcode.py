"""Transfer-syntax selection and conversion for RAD-75 / RAD-69 responses.

A RAD-75 request carries a TransferSyntaxUIDList: the syntaxes the Imaging Document Consumer can
decode. Pixel data must be returned in one of them, otherwise an error is returned for that
instance (RAD TF-3 4.69.4.1.2, assertion RAD69-005). :func:`choose_syntax` makes that decision
from the stored syntax alone (so a responder can decide before fetching), :func:`transcode`
re-encodes one Part 10 object, and :func:`convert_for` does both, falling back to the next
acceptable syntax when an encoder cannot take this particular image (e.g. a JPEG 2000 encoder
and a 16x16 icon).

Policy:

* a stored syntax the consumer lists is returned as is (no re-encoding, not even a relabel);
* otherwise XIG prefers Explicit VR Little Endian, then Implicit VR Little Endian, then a lossless
  compressed syntax (JPEG-LS lossless, JPEG 2000 lossless, RLE), then Deflated Explicit VR LE;
* XIG never *produces* lossy compression (it would degrade a diagnostic image without the
  consumer asking), nor Explicit VR Big Endian (retired in PS3.5 2004), nor JPIP references
  (.94/.95: "pixel data provider" URLs, which XIG does not serve). It *reads* Big Endian and every
  compressed syntax an installed pydicom plugin decodes, lossy ones included (decompressing a
  lossy image does not degrade it further; Lossy Image Compression stays "01");
* the SOP Instance UID is kept: a lossless re-encoding is the same instance (PS3.5 8.2), and the
  RAD-75 DocumentUniqueId the consumer asked for must be the one it gets back.

Everything is per instance: one object is decoded and re-encoded in memory at a time.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydicom import dcmread, dcmwrite
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.encoders.base import get_encoder
from pydicom.uid import UID

from gateway.dicom.kos import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from gateway.errors import XigError

__all__ = [
    "DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN",
    "EXPLICIT_VR_BIG_ENDIAN",
    "EXPLICIT_VR_LITTLE_ENDIAN",
    "IMPLICIT_VR_LITTLE_ENDIAN",
    "JPEG_2000_LOSSLESS",
    "JPEG_LOSSLESS",
    "JPEG_LOSSLESS_SV1",
    "JPEG_LS_LOSSLESS",
    "PREFERENCE",
    "RLE_LOSSLESS",
    "Decision",
    "TranscodeError",
    "can_decode",
    "can_encode",
    "choose_syntax",
    "convert_for",
    "syntax_name",
    "transcode",
]

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.57"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_LS_NEAR_LOSSLESS = "1.2.840.10008.1.2.4.81"
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_2000 = "1.2.840.10008.1.2.4.91"
JPEG_2000_MC_LOSSLESS = "1.2.840.10008.1.2.4.92"
JPEG_2000_MC = "1.2.840.10008.1.2.4.93"
JPIP_REFERENCED = "1.2.840.10008.1.2.4.94"
JPIP_REFERENCED_DEFLATE = "1.2.840.10008.1.2.4.95"
HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
HTJ2K_RPCL_LOSSLESS = "1.2.840.10008.1.2.4.202"
HTJ2K = "1.2.840.10008.1.2.4.203"
JPIP_HTJ2K_REFERENCED = "1.2.840.10008.1.2.4.204"
JPIP_HTJ2K_REFERENCED_DEFLATE = "1.2.840.10008.1.2.4.205"

#: The order in which XIG picks a target among the syntaxes a consumer accepts.
PREFERENCE: tuple[str, ...] = (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    JPEG_LS_LOSSLESS,
    JPEG_2000_LOSSLESS,
    JPEG_LOSSLESS_SV1,
    JPEG_LOSSLESS,
    RLE_LOSSLESS,
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
)

_NATIVE = frozenset(
    {IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN}
)
_JPIP = frozenset({JPIP_REFERENCED, JPIP_REFERENCED_DEFLATE, JPIP_HTJ2K_REFERENCED, JPIP_HTJ2K_REFERENCED_DEFLATE})
#: syntaxes whose encoding loses information (or may: XIG cannot tell a reversible .91 from an irreversible one)
_LOSSY = frozenset({JPEG_BASELINE, JPEG_EXTENDED, JPEG_LS_NEAR_LOSSLESS, JPEG_2000, JPEG_2000_MC, HTJ2K})
#: lossy syntaxes whose pixel data is certainly lossy-compressed (JPEG DCT processes)
_CERTAINLY_LOSSY = {JPEG_BASELINE: "ISO_10918_1", JPEG_EXTENDED: "ISO_10918_1"}
#: MPEG-2, MPEG-4 AVC/H.264, HEVC/H.265 and SMPTE ST 2110 video: stored and served as is, never decoded
_VIDEO_PREFIXES = ("1.2.840.10008.1.2.4.10", "1.2.840.10008.1.2.7.")
#: lossless encapsulated targets that pydicom encodes (through plugins)
_PYDICOM_ENCODED = frozenset({RLE_LOSSLESS, JPEG_LS_LOSSLESS, JPEG_2000_LOSSLESS})
_PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)  # Float / Double Float / Pixel Data


class TranscodeError(XigError):
    """An object cannot be returned in a requested syntax; ``str()`` is fit for a RegistryError codeContext."""


def _norm(ts: str) -> str:
    return ts.replace("\x00", "").strip()


def syntax_name(ts: str) -> str:
    """A human name for a transfer syntax UID (``"JPEG 2000 Image Compression (Lossless Only)"``)."""
    ts = _norm(ts)
    uid = UID(ts)
    if uid.is_valid and uid.name != ts:
        return f"{uid.name} ({ts})"
    return ts


def _is_video(ts: str) -> bool:
    return ts.startswith(_VIDEO_PREFIXES)


def _why_not_decodable(ts: str) -> str | None:
    """``None`` when XIG can decode pixel data stored in ``ts``, else the reason."""
    if ts in _NATIVE:
        return None
    if ts in _JPIP:
        return "its pixel data is only referenced through JPIP, not present in the object"
    if _is_video(ts):
        return "XIG does not decode video transfer syntaxes"
    try:
        decoder = get_decoder(UID(ts))
    except NotImplementedError:
        return "it is not a transfer syntax XIG knows how to decode"
    if not decoder.is_available:
        return f"no decoder plugin for it is installed ({decoder.missing_dependencies[0]})"
    return None


def _why_not_encodable(ts: str) -> str | None:
    """``None`` when XIG produces ``ts``, else the reason (policy or missing plugin)."""
    if ts in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN):
        return None
    if ts == EXPLICIT_VR_BIG_ENDIAN:
        return "XIG does not produce the retired Explicit VR Big Endian"
    if ts in _JPIP:
        return "XIG does not serve JPIP-referenced pixel data"
    if ts in _LOSSY:
        return "XIG never produces lossy compression"
    if _is_video(ts):
        return "XIG does not encode video"
    if ts in (JPEG_LOSSLESS_SV1, JPEG_LOSSLESS):
        return None  # XIG's own encoder below (numpy only); a Selection Value 1 stream is valid Process 14
    if ts in _PYDICOM_ENCODED:
        encoder = get_encoder(UID(ts))
        if encoder.is_available:
            return None
        return f"no encoder plugin for it is installed ({encoder.missing_dependencies[0]})"
    if UID(ts).is_transfer_syntax:
        return "XIG has no encoder for it"
    return "it is not a transfer syntax XIG knows"


def can_decode(ts: str) -> bool:
    """Whether pixel data stored in ``ts`` can be decoded with what is installed."""
    return _why_not_decodable(_norm(ts)) is None


def can_encode(ts: str) -> bool:
    """Whether XIG produces ``ts`` (installed encoders, minus what policy forbids: lossy, Big Endian, JPIP)."""
    return _why_not_encodable(_norm(ts)) is None


@dataclass(frozen=True)
class Decision:
    """What to do with one stored instance for one TransferSyntaxUIDList."""

    action: Literal["as_is", "transcode", "impossible"]
    #: the syntax the instance will be returned in (``None`` when impossible)
    target: str | None = None
    #: why it is impossible (a codeContext), empty otherwise
    reason: str = ""
    #: further acceptable targets, in preference order, should encoding to ``target`` fail
    alternatives: tuple[str, ...] = ()

    @classmethod
    def as_is(cls, ts: str) -> Decision:
        return cls("as_is", ts)

    @classmethod
    def convert(cls, target: str, alternatives: Sequence[str] = ()) -> Decision:
        return cls("transcode", target, alternatives=tuple(alternatives))

    @classmethod
    def impossible(cls, reason: str) -> Decision:
        return cls("impossible", None, reason)

    @property
    def return_as_is(self) -> bool:
        return self.action == "as_is"

    @property
    def possible(self) -> bool:
        return self.action != "impossible"


def choose_syntax(stored: str, accepted: Sequence[str], *, has_pixel_data: bool = True) -> Decision:
    """Decide how to answer a RAD-75 TransferSyntaxUIDList for an instance stored in ``stored``.

    ``has_pixel_data=False`` (SR, KO, PR, encapsulated documents...) widens the choice: without
    pixel data a syntax only fixes the dataset encoding (encapsulated syntaxes mean Explicit VR
    Little Endian, PS3.5 A.4), so any accepted standard syntax can be written, no codec involved.
    """
    stored = _norm(stored)
    wanted = list(dict.fromkeys(t for t in (_norm(a) for a in accepted) if t))
    if not wanted:
        return Decision.impossible("the request lists no transfer syntax")
    if stored in wanted:
        return Decision.as_is(stored)
    stored_name = syntax_name(stored)
    if not has_pixel_data:
        relabels = [t for t in PREFERENCE if t in wanted]
        relabels += [t for t in wanted if t not in relabels and _relabel_ok(t)]
        if relabels:
            return Decision.convert(relabels[0], relabels[1:])
    elif (why := _why_not_decodable(stored)) is not None:
        return Decision.impossible(f"cannot convert {stored_name} to {_names(wanted)}: {why}")
    candidates = [t for t in PREFERENCE if t in wanted and can_encode(t)]
    if candidates:
        return Decision.convert(candidates[0], candidates[1:])
    reasons = "; ".join(f"{syntax_name(t)}: {_why_not_encodable(t)}" for t in wanted)
    return Decision.impossible(f"cannot convert {stored_name} to any requested transfer syntax ({reasons})")


def _relabel_ok(ts: str) -> bool:
    """A syntax an object without pixel data may be written in (little endian, explicit, not JPIP/video)."""
    uid = UID(ts)
    return uid.is_transfer_syntax and uid.is_little_endian and ts not in _JPIP and not _is_video(ts)


def _names(syntaxes: Sequence[str]) -> str:
    return " or ".join(syntax_name(t) for t in syntaxes)


# --------------------------------------------------------------------------------------------
# conversion


def _read(data: bytes) -> FileDataset:
    try:
        ds = dcmread(io.BytesIO(data))
    except InvalidDicomError as exc:
        raise TranscodeError(f"not a DICOM Part 10 object: {exc}") from exc
    except (ValueError, KeyError, IndexError, EOFError, TypeError, OSError) as exc:
        raise TranscodeError(f"unreadable DICOM object: {exc}") from exc
    if "TransferSyntaxUID" not in ds.file_meta:
        raise TranscodeError("the DICOM object has no Transfer Syntax UID in its file meta information")
    return ds


def _has_pixels(ds: Dataset) -> bool:
    return any(tag in ds for tag in _PIXEL_TAGS)


_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def _swap(value: bytes, width: int) -> bytes:
    usable = len(value) - len(value) % width
    swapped = np.frombuffer(value, dtype=f">u{width}", count=usable // width).astype(f"<u{width}").tobytes()
    return swapped + value[usable:]


def _big_to_little(ds: Dataset) -> None:
    """Byte-swap the "other" binary values of a dataset read as Big Endian (PS3.5 7.3).

    pydicom decodes numbers (US, SL, FD, ...) with the byte order they were read in and re-encodes
    them on write, but OB/OW/OF... values are kept as raw bytes: their words must be swapped here.
    Pixel Data swaps per Bits Allocated (a 32-bit sample is one 4-byte word).
    """
    for elem in list(ds.iterall()):
        if elem.VR == "SQ" or not isinstance(elem.value, bytes | bytearray) or elem.value == b"":
            continue
        if elem.tag == 0x7FE00010:
            bits = int(ds.get("BitsAllocated", 8))
            width = bits // 8 if bits >= 16 else (2 if elem.VR == "OW" else 1)
        else:
            width = _SWAP_WIDTH.get(elem.VR, 1)
        if width > 1:
            elem.value = _swap(bytes(elem.value), width)


def _mark_lossy(ds: Dataset, source: str) -> None:
    method = _CERTAINLY_LOSSY.get(source)
    if method and "PixelData" in ds and ds.get("LossyImageCompression") != "01":
        ds.LossyImageCompression = "01"
        if "LossyImageCompressionMethod" not in ds:
            ds.LossyImageCompressionMethod = method


def transcode(data: bytes, target: str) -> bytes:
    """Re-encode one Part 10 object in ``target``; pixel-exact for lossless sources.

    Returns ``data`` itself when it is already in ``target``. Raises :class:`TranscodeError` with
    a reason such as "cannot convert JPEG 2000 ... to JPEG-LS Lossless ...: <why>".
    """
    target = _norm(target)
    ds = _read(data)
    source = _norm(str(ds.file_meta.TransferSyntaxUID))
    if source == target:
        return data
    prefix = f"cannot convert {syntax_name(source)} to {syntax_name(target)}"
    pixels = _has_pixels(ds)
    why = _why_not_encodable(target)
    if why is not None and not (not pixels and _relabel_ok(target)):
        raise TranscodeError(f"{prefix}: {why}")
    if pixels and (why := _why_not_decodable(source)) is not None:
        raise TranscodeError(f"{prefix}: {why}")
    if target not in _NATIVE and any(t in ds for t in _PIXEL_TAGS[:2]):
        raise TranscodeError(f"{prefix}: Float/Double Float Pixel Data exists only in native (uncompressed) syntaxes")
    try:
        out = _reencode(ds, source, target)
    except TranscodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - codec plugins raise anything; the partner gets a reason
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise TranscodeError(f"{prefix}: {detail}") from exc
    return out


def _reencode(ds: FileDataset, source: str, target: str) -> bytes:
    meta = ds.file_meta
    if source == EXPLICIT_VR_BIG_ENDIAN:
        _big_to_little(ds)
        meta.TransferSyntaxUID = UID(EXPLICIT_VR_LITTLE_ENDIAN)
        ds.set_original_encoding(False, True, ds.original_character_set)
    elif source not in _NATIVE and "PixelData" in ds:
        ds.decompress(as_rgb=True, generate_instance_uid=False)
        _mark_lossy(ds, source)
    if "PixelData" in ds and target in _PYDICOM_ENCODED:
        ds.compress(UID(target), generate_instance_uid=False)
    elif "PixelData" in ds and target in (JPEG_LOSSLESS_SV1, JPEG_LOSSLESS):
        _compress_jpeg_lossless(ds)
    elif "PixelData" in ds and target not in _NATIVE:
        raise TranscodeError(f"XIG has no encoder for {syntax_name(target)}")
    meta.TransferSyntaxUID = UID(target)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if "PixelData" in ds:
        pixel = ds["PixelData"]
        if target in _NATIVE:
            bits = int(ds.get("BitsAllocated", 8))
            ds["PixelData"] = DataElement(0x7FE00010, "OW" if bits > 8 else "OB", pixel.value)
    ts = UID(target)
    buf = io.BytesIO()
    # dcmwrite, not save_as: save_as refuses Big → Little Endian, which _big_to_little made safe
    dcmwrite(buf, ds, enforce_file_format=True, implicit_vr=ts.is_implicit_VR, little_endian=True)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14, Selection Value 1)
#
# pydicom 3 decodes 1.2.840.10008.1.2.4.70 (via pylibjpeg-libjpeg) but has no encoder for it, and
# it is the lossless syntax the most consumers list. ITU-T T.81 (ISO/IEC 10918-1) H.1: predictor 1
# (left neighbour; the first row predicts from the left, the first column from above, the first
# sample from 2^(P-1)), point transform 0, one interleaved scan, one Huffman table optimised per
# frame (Annex K.2-K.4), no restart intervals. Vectorised with numpy, chunked to bound memory.

_CHUNK = 1 << 18
_BIT_LENGTH = np.zeros(32769, dtype=np.int64)
for _k in range(1, 17):
    _BIT_LENGTH[1 << (_k - 1) : min(1 << _k, 32769)] = _k


def _huffman_table(freq: np.ndarray) -> tuple[list[int], list[int]]:
    """BITS (counts of codes of length 1..16) and HUFFVAL for symbol frequencies (T.81 Annex K.2-K.4)."""
    f = [int(x) for x in freq] + [1]  # the reserved symbol keeps the all-ones code unused
    n = len(f)
    codesize = [0] * n
    others = [-1] * n
    while True:
        live = [i for i in range(n) if f[i] > 0]
        if len(live) < 2:
            break
        # least frequent; among equals the largest symbol (K.2: "if more than one, the largest value of V")
        v1 = min(live, key=lambda i: (f[i], -i))
        v2 = min((i for i in live if i != v1), key=lambda i: (f[i], -i))
        f[v1] += f[v2]
        f[v2] = 0
        codesize[v1] += 1
        while others[v1] != -1:
            v1 = others[v1]
            codesize[v1] += 1
        others[v1] = v2
        codesize[v2] += 1
        while others[v2] != -1:
            v2 = others[v2]
            codesize[v2] += 1
    bits = [0] * 33
    for size in codesize:
        if size:
            bits[size] += 1
    for i in range(32, 16, -1):  # K.3 Adjust_BITS: no code longer than 16 bits
        while bits[i] > 0:
            j = i - 2
            while bits[j] == 0:
                j -= 1
            bits[i] -= 2
            bits[i - 1] += 1
            bits[j + 1] += 2
            bits[j] -= 1
    i = 16
    while bits[i] == 0:
        i -= 1
    bits[i] -= 1  # drop the reserved code
    values = [v for size in range(1, 33) for v in range(n - 1) if codesize[v] == size]
    return bits[1:17], values


def _canonical_codes(bits: list[int], values: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Code and length per category (T.81 Annex C)."""
    codes = np.zeros(17, dtype=np.uint64)
    lengths = np.zeros(17, dtype=np.int64)
    code, k = 0, 0
    for size in range(1, 17):
        for _ in range(bits[size - 1]):
            codes[values[k]] = code
            lengths[values[k]] = size
            code += 1
            k += 1
        code <<= 1
    return codes, lengths


def _pack(values: np.ndarray, lengths: np.ndarray) -> bytes:
    """Concatenate variable-length bit fields (MSB first), pad with 1-bits, stuff 0x00 after 0xFF.

    Each field (at most 31 bits) is shifted into the 40-bit window of the 5 bytes it starts in;
    fields never share a bit, so adding the windows' bytes per byte index is OR-ing them.
    """
    total_bits = int(lengths.sum())
    nbytes = (total_bits + 7) // 8
    out = np.zeros(nbytes + 5, dtype=np.int64)
    pos = 0
    for start in range(0, len(values), _CHUNK):
        n = lengths[start : start + _CHUNK]
        ends = pos + np.cumsum(n)
        starts = ends - n
        pos = int(ends[-1])
        first = starts >> 3
        aligned = values[start : start + _CHUNK] << (40 - (starts & 7) - n).astype(np.uint64)
        base = int(first[0])
        span = int(first[-1]) - base + 5
        for k in range(5):
            part = ((aligned >> np.uint64(8 * (4 - k))) & np.uint64(0xFF)).astype(np.float64)
            out[base : base + span] += np.bincount(first - base + k, weights=part, minlength=span).astype(np.int64)
    if total_bits % 8:
        out[nbytes - 1] |= (1 << (8 - total_bits % 8)) - 1
    stream = out[:nbytes].astype(np.uint8)
    return np.insert(stream, np.flatnonzero(stream == 0xFF) + 1, 0).tobytes()


def _jpeg_lossless_frame(frame: np.ndarray, precision: int) -> bytes:
    """One frame (rows, columns[, samples]) of unsigned ``precision``-bit samples as a JPEG stream."""
    a = frame.astype(np.int64)
    if a.ndim == 2:
        a = a[:, :, None]
    rows, cols, comps = a.shape
    pred = np.empty_like(a)
    pred[0, 0, :] = 1 << (precision - 1)
    pred[0, 1:, :] = a[0, :-1, :]
    pred[1:, 0, :] = a[:-1, 0, :]
    pred[1:, 1:, :] = a[1:, :-1, :]
    diff = ((a - pred) & 0xFFFF).reshape(-1)  # modulo 2^16 (H.1.2.1), interleaved sample order
    diff = np.where(diff >= 32768, diff - 65536, diff)
    ssss = _BIT_LENGTH[np.abs(diff)]
    extra_len = np.where(ssss == 16, 0, ssss)  # category 16 (difference 32768) has no extra bits
    extra = np.where(diff < 0, diff - 1, diff) & ((np.int64(1) << extra_len) - 1)
    bits, huffval = _huffman_table(np.bincount(ssss, minlength=17))
    codes, code_len = _canonical_codes(bits, huffval)
    fields = (codes[ssss] << extra_len.astype(np.uint64)) | extra.astype(np.uint64)
    scan = _pack(fields, code_len[ssss] + extra_len)

    def segment(marker: int, payload: bytes) -> bytes:
        return bytes((0xFF, marker)) + (len(payload) + 2).to_bytes(2, "big") + payload

    sof = bytes((precision,)) + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + bytes((comps,))
    sof += b"".join(bytes((c + 1, 0x11, 0)) for c in range(comps))
    dht = bytes((0x00,)) + bytes(bits) + bytes(huffval)
    sos = bytes((comps,)) + b"".join(bytes((c + 1, 0x00)) for c in range(comps)) + bytes((1, 0, 0))
    return b"\xff\xd8" + segment(0xC3, sof) + segment(0xC4, dht) + segment(0xDA, sos) + scan + b"\xff\xd9"


def _compress_jpeg_lossless(ds: Dataset) -> None:
    """Replace native Pixel Data by JPEG Lossless SV1 fragments (one frame per fragment, PS3.5 A.4)."""
    from pydicom.encaps import encapsulate

    bits_allocated = int(ds.BitsAllocated)
    precision = int(ds.get("BitsStored", bits_allocated))
    samples = int(ds.get("SamplesPerPixel", 1))
    if bits_allocated not in (8, 16) or not 2 <= precision <= 16:
        raise TranscodeError(
            f"JPEG Lossless takes 2 to 16 bits per sample in 8 or 16 bits allocated, "
            f"this image has {precision} of {bits_allocated}"
        )
    if samples not in (1, 3):
        raise TranscodeError(f"JPEG Lossless is used with 1 or 3 samples per pixel, this image has {samples}")
    if str(ds.get("PhotometricInterpretation", "")).startswith("YBR_") and samples == 3:
        raise TranscodeError("XIG encodes JPEG Lossless from RGB or monochrome pixel data only")
    arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames == 1:
        arr = arr[None, ...]
    mask = (1 << precision) - 1
    fragments = [_jpeg_lossless_frame(np.asarray(f).astype(np.int64) & mask, precision) for f in arr]
    ds.PixelData = encapsulate(fragments)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    if samples == 3:
        ds.PlanarConfiguration = 0


def convert_for(data: bytes, stored: str, accepted: Sequence[str]) -> tuple[str, bytes]:
    """Choose and convert in one step: ``(transfer syntax, Part 10 bytes)`` acceptable to the consumer.

    Tries the preferred target, then the alternatives (an encoder may refuse one image, e.g. JPEG
    2000 below 32 pixels or JPEG-LS above 16 bits). Raises :class:`TranscodeError` naming every
    failure when none works.
    """
    decision = choose_syntax(stored, accepted, has_pixel_data=_has_pixels(_read(data)))
    if decision.action == "impossible" or decision.target is None:
        raise TranscodeError(decision.reason)
    if decision.return_as_is:
        return decision.target, data
    failures: list[str] = []
    for target in (decision.target, *decision.alternatives):
        try:
            return target, transcode(data, target)
        except TranscodeError as exc:
            failures.append(str(exc))
    raise TranscodeError("; ".join(failures))
