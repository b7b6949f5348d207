"""Demographic matching for the responding gateway's ITI-55 (XCPD) service.

IHE leaves matching to local policy but requires that *every* supplied query element is used and that
only "high degree" matches are returned (ITI TF-2 3.55.4.1.3.1). This module is that policy: pure logic
(:func:`score_candidate`, :func:`decide`) plus a small async helper that pre-selects candidates from the
PACS (:func:`find_candidates`, :func:`match_patients`).

Pipeline
    ``candidate_queries(query)`` → ``PacsBackend.find_patients`` (union, de-duplicated) → optional extra
    :class:`Demographics` per record from a local identity table → ``decide(query, candidates, policy)``
    → :class:`~gateway.ihe.iti55.Matches` | :class:`~gateway.ihe.iti55.MoreAttributesRequested` |
    :class:`~gateway.ihe.iti55.NoMatch`, ready for :func:`gateway.ihe.iti55.build_response`.

Pre-selection (:func:`candidate_query`)
    Loose on purpose, since phonetic matching must still find "Smyth" for "Smith":

    * a birth date in the query → the whole birth **year** (or the queried range), no name filter: catches
      misspelt and phonetic names and day/month typos; a typo in the year is not recovered;
    * otherwise a name → ``family`` = the first letter (``family_prefix_length``) of the accent-folded family
      name, upper case, meant as a case-insensitive prefix (DICOM ``S*``); None (no filter) when the query's
      names start with different letters or with a non-ASCII letter;
    * LivingSubjectIds in our assigning authority (or mapped by the link function) → a separate
      ``PatientQuery(patient_ids=...)`` (:func:`candidate_queries`); results are united by PatientID.

    :func:`candidate_queries` never sends an empty ``PatientQuery()`` (a scan of the whole PACS): a query
    with no birth date and no usable family prefix finds candidates by id only. Nothing is lost, since
    without a birth date no candidate can reach the threshold and IHE has no code to ask for one.

Scoring (:func:`score_candidate`, 0-100)
    ``score = 100 × Σ wᵢ·sᵢ / Σ wᵢ`` over the elements counted, each similarity ``sᵢ`` in [0, 1]:

    ====================  ======  ===================================================================
    element               weight  counted
    ====================  ======  ===================================================================
    family name           30      always (core); 0 if the query has none, 0.5 if the candidate has none
    given name(s)         20      always (core); as above
    birth date            35      always (core); as above
    gender                10      when both sides have M or F
    address               15      when both sides have one (best pair; postal code, street, city, state)
    telecom               15      when both sides have one (1 if any normalised number/e-mail is equal)
    mother's maiden name  10      when both sides have one
    birth place (name)     5      when both sides have one
    birth place (address)  5      when both sides have one
    principal care prov.   5      when both sides have one (1 if any id is equal)
    ====================  ======  ===================================================================

    *Names* are compared case-, accent- and punctuation-insensitively (``José Müller`` = ``JOSE MULLER``,
    ``O'Brien`` = ``OBRIEN``, ``García-López`` = ``Garcia Lopez``); token similarity is 1 for equal tokens,
    0.9 when phonetically equal (jellyfish Metaphone plus NYSIIS or Jaro-Winkler ≥ 0.85: Smith/Smyth,
    Müller/Mueller), else 0.5-0.85 for Jaro-Winkler ≥ 0.85, else 0. Multi-part family names align token by
    token (one side having only one part of a double name: ×0.95). Given names accept initials (0.7),
    prefixes such as Jim/Jimmy (0.85) and swapped order (×0.95); a family/given swap scores ×0.9. Several
    query names are OR'ed (best one counts), as are several candidate names (aliases from
    :class:`Demographics`).

    *Birth date*: exact 1; query ``YYYYMM`` 0.75, ``YYYY`` 0.5; a range 1 (one day) / 0.75 (≤ 31 days) /
    0.5 (≤ 1 year) / 0.3; a likely typo (same year and one differing digit, or day and month swapped) 0.5;
    the same day/month with one differing year digit 0.3; anything else **disqualifies**.

    *Gender* M vs F **disqualifies**; UN/O/empty on either side is neutral (not counted).

    *Neutral* means not counted: an optional element the candidate lacks neither raises nor lowers the
    score. The core elements (name, birth date) are always counted so that no patient is returned on
    name alone: a candidate lacking one gets half credit (unverified), a query lacking one gets none.

    *Identifiers*: a LivingSubjectId in our assigning authority (or mapped to a local PatientID by the
    optional ``link`` function, e.g. an SSN link table) equal to the candidate's PatientID is decisive:
    score 100, minus 30 per contradicting core element (gender, birth date, family name similarity < 0.5).
    A local id that names a *different* patient disqualifies the candidate (``MatchPolicy.id_mismatch``).
    Ids in other authorities are otherwise ignored.

Decision (:func:`decide`, defaults of :class:`MatchPolicy`)
    * ≥ ``threshold`` (85): one → Matches; several → ``multiple="list"`` returns them (best first, at most
      ``max_results`` = 5; more than that → ask for attributes if any would help), ``multiple="ask-more"``
      returns the best alone if it leads by ``clear_margin`` (10), else MoreAttributesRequested with the
      attributes that tell them apart, else NoMatch;
    * best in ``ask_more_band`` (60..85) → MoreAttributesRequested with the codes the query did not supply
      but the candidates know (gender, address, telecom, birth place, mother's maiden name), NoMatch if none;
    * otherwise NoMatch. MinimumDegreeMatch from the query is not used (TF-2 allows ignoring it).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Literal

import jellyfish

from gateway.ihe.iti55 import (
    ADDRESS_REQUESTED,
    BIRTH_PLACE_ADDRESS_REQUESTED,
    BIRTH_PLACE_NAME_REQUESTED,
    GENDER_REQUESTED,
    II,
    MORE_ATTRIBUTE_CODES,
    MOTHERS_MAIDEN_NAME_REQUESTED,
    TELECOM_REQUESTED,
    Address,
    BirthTime,
    MatchedPatient,
    Matches,
    MoreAttributesRequested,
    NoMatch,
    PatientDemographics,
    PatientDiscoveryQuery,
    PersonName,
    Telecom,
    bare_oid,
    date_bounds,
    parse_date,
)
from gateway.pacs.base import PacsBackend, PatientQuery, PatientRecord

#: Maps an identifier in another assigning authority to a local PatientID (a link table), or None.
IdLink = Callable[[II], str | None]
Decision = Matches | MoreAttributesRequested | NoMatch


@dataclass(frozen=True)
class Demographics:
    """Demographics a local identity table may hold beyond the PACS patient module."""

    addresses: tuple[Address, ...] = ()
    telecoms: tuple[Telecom, ...] = ()
    mothers_maiden_name: PersonName | None = None
    birth_place_name: str | None = None
    birth_place_address: Address | None = None
    #: other names (aliases, previous names) that also match
    names: tuple[PersonName, ...] = ()
    #: identifiers in other authorities, returned as asOtherIDs
    other_ids: tuple[II, ...] = ()
    care_provider_ids: tuple[II, ...] = ()


#: Looks up extra demographics (local identity table) for a PACS patient, or None.
IdentitySource = Callable[[PatientRecord], Demographics | None]


@dataclass(frozen=True)
class Candidate:
    record: PatientRecord
    extra: Demographics = field(default_factory=Demographics)


@dataclass(frozen=True)
class Weights:
    family: float = 30
    given: float = 20
    birth_date: float = 35
    gender: float = 10
    address: float = 15
    telecom: float = 15
    mothers_maiden_name: float = 10
    birth_place_name: float = 5
    birth_place_address: float = 5
    care_provider: float = 5


@dataclass(frozen=True)
class MatchPolicy:
    threshold: int = 85
    ask_more_band: tuple[int, int] = (60, 85)
    multiple: Literal["list", "ask-more"] = "list"
    max_results: int = 5
    #: with ``multiple="ask-more"``, a best match leading the next one by this much is returned alone
    clear_margin: int = 10
    #: a LivingSubjectId in our authority naming another patient disqualifies the candidate
    id_mismatch_disqualifies: bool = True
    weights: Weights = field(default_factory=Weights)

    def __post_init__(self) -> None:
        low, high = self.ask_more_band
        if not 0 < self.threshold <= 100:
            raise ValueError("threshold must be in 1..100")
        if not 0 <= low <= high <= self.threshold:
            raise ValueError("ask_more_band must be (low, high) with 0 <= low <= high <= threshold")
        if self.max_results < 1:
            raise ValueError("max_results must be at least 1")
        if self.multiple not in ("list", "ask-more"):
            raise ValueError("multiple must be 'list' or 'ask-more'")


@dataclass(frozen=True)
class CandidateScore:
    candidate: Candidate
    score: int
    #: similarity (0-1) of each element that was counted
    components: Mapping[str, float]
    #: why the candidate was ruled out (score 0), None otherwise
    disqualified: str | None = None
    id_match: bool = False


# -- normalisation -----------------------------------------------------------------------------------

_TRANSLIT = str.maketrans(
    {
        "ß": "ss",
        "æ": "ae",
        "Æ": "AE",
        "ø": "o",
        "Ø": "O",
        "œ": "oe",
        "Œ": "OE",
        "ł": "l",
        "Ł": "L",
        "đ": "d",
        "Đ": "D",
        "ð": "d",
        "þ": "th",
        "ı": "i",
    }
)
_APOSTROPHES = re.compile(r"['’‘`´]")
_NON_WORD = re.compile(r"[\W_]+")


def fold(text: str) -> str:
    """Case-, accent- and punctuation-insensitive form: ``"José  O'Brien-Müller"`` → ``"jose obrien muller"``."""
    t = unicodedata.normalize("NFKD", text.translate(_TRANSLIT))
    t = "".join(c for c in t if not unicodedata.combining(c)).casefold()
    t = _APOSTROPHES.sub("", t)
    return _NON_WORD.sub(" ", t).strip()


def _tokens(parts: Iterable[str]) -> list[str]:
    return [tok for part in parts for tok in fold(part).split()]


def token_similarity(a: str, b: str) -> float:
    """Similarity of two folded name tokens: 1 equal, 0.9 phonetically equal, 0.5-0.85 close spelling, else 0."""
    if a == b:
        return 1.0
    if not a or not b:
        return 0.0
    jw = jellyfish.jaro_winkler_similarity(a, b)
    if jellyfish.metaphone(a) == jellyfish.metaphone(b) and (jellyfish.nysiis(a) == jellyfish.nysiis(b) or jw >= 0.85):
        return 0.9
    if jw >= 0.85:
        return 0.5 + (jw - 0.85) / 0.15 * 0.35
    return 0.0


def _given_token_similarity(a: str, b: str) -> float:
    if a == b:
        return 1.0
    if len(a) == 1 or len(b) == 1:  # an initial
        return 0.7 if a[0] == b[0] else 0.0
    if min(len(a), len(b)) >= 3 and (a.startswith(b) or b.startswith(a)):  # Jim / Jimmy, Chris / Christopher
        return max(0.85, token_similarity(a, b))
    return token_similarity(a, b)


def family_similarity(query_parts: Sequence[str], candidate_parts: Sequence[str]) -> float | None:
    """Similarity of two family names (each possibly several parts); None when one side has none."""
    qt, ct = _tokens(query_parts), _tokens(candidate_parts)
    if not qt or not ct:
        return None
    joined = token_similarity("".join(qt), "".join(ct))
    if joined == 1.0:
        return 1.0
    short, long = (qt, ct) if len(qt) <= len(ct) else (ct, qt)
    aligned = sum(max(token_similarity(s, t) for t in long) for s in short) / len(short)
    if len(qt) != len(ct):
        aligned *= 0.95
    return max(aligned, joined)


def given_similarity(query_parts: Sequence[str], candidate_parts: Sequence[str]) -> float | None:
    """Similarity of given names: the first query given name counts 75 %, the others 25 %; order-tolerant."""
    qt, ct = _tokens(query_parts), _tokens(candidate_parts)
    if not qt or not ct:
        return None

    def best(token: str) -> tuple[float, int]:
        sims = [(_given_token_similarity(token, c), i) for i, c in enumerate(ct)]
        return max(sims, key=lambda s: (s[0], -s[1]))

    first, where = best(qt[0])
    if where != 0:
        first *= 0.95  # swapped given names
    if len(qt) == 1:
        return first
    rest = sum(best(t)[0] for t in qt[1:]) / (len(qt) - 1)
    return 0.75 * first + 0.25 * rest


def _name_parts(name: PersonName) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(family parts, given parts); an unstructured name is read as "given ... family"."""
    if name.family or name.given:
        return name.family, name.given
    words = (name.text or "").split()
    if not words:
        return (), ()
    return (words[-1],), tuple(words[:-1])


def _name_pair(q: PersonName, c: PersonName, w: Weights) -> tuple[float, float]:
    """(family, given) similarity with the core rules for missing parts and a family/given swap."""
    qf, qg = _name_parts(q)
    cf, cg = _name_parts(c)

    def core(sim: float | None, query_has: bool) -> float:
        if not query_has:
            return 0.0
        return 0.5 if sim is None else sim

    direct = (core(family_similarity(qf, cf), bool(qf)), core(given_similarity(qg, cg), bool(qg)))
    if q.text and not (q.family or q.given):  # unstructured: also try "family given ..."
        words = (q.text or "").split()
        alt = PersonName(family=(words[0],), given=tuple(words[1:]))
        direct = max(direct, _name_pair(alt, c, w), key=lambda p: p[0] * w.family + p[1] * w.given)
    swapped_f = family_similarity(qg, cf) if qg else None
    swapped_g = given_similarity(qf, cg) if qf else None
    if swapped_f is not None and swapped_g is not None:
        swapped = (swapped_f * 0.9, swapped_g * 0.9)
        if swapped[0] * w.family + swapped[1] * w.given > direct[0] * w.family + direct[1] * w.given:
            return swapped
    return direct


# -- element similarities ------------------------------------------------------------------------------


def _candidate_birth_bounds(value: str) -> tuple[date, date] | None:
    try:
        return date_bounds(parse_date(value))
    except ValueError:
        return None


def birth_date_similarity(query: BirthTime, candidate: str) -> float | None:
    """Similarity of a candidate birth date with the criterion; None when they contradict."""
    bounds = _candidate_birth_bounds(candidate) if candidate else None
    if bounds is None:
        return 0.5
    c_lo, c_hi = bounds
    q_lo, q_hi = query.bounds()
    if c_lo != c_hi:  # the candidate's own date is partial: only overlap can be checked
        return 0.5 if c_lo <= q_hi and q_lo <= c_hi else None
    day = c_lo
    if query.value is not None and len(query.value) == 8:
        if day == q_lo:
            return 1.0
        return _typo_similarity(query.value, day.strftime("%Y%m%d"))
    if not q_lo <= day <= q_hi:
        return None
    if query.value is not None:
        return 0.75 if len(query.value) == 6 else 0.5
    width = (q_hi - q_lo).days + 1
    if width <= 1:
        return 1.0
    if width <= 31:
        return 0.75
    if width <= 366:
        return 0.5
    return 0.3


def _typo_similarity(q: str, c: str) -> float | None:
    """A likely keying error between two YYYYMMDD dates, or None."""
    if q[:4] == c[:4]:
        if sum(a != b for a, b in zip(q[4:], c[4:], strict=True)) == 1:
            return 0.5
        if q[4:6] == c[6:8] and q[6:8] == c[4:6]:  # day and month swapped
            return 0.5
        return None
    if q[4:] == c[4:] and sum(a != b for a, b in zip(q[:4], c[:4], strict=True)) == 1:
        return 0.3
    return None


_STREET_WORDS = {
    "street": "st",
    "str": "st",
    "avenue": "ave",
    "av": "ave",
    "road": "rd",
    "drive": "dr",
    "boulevard": "blvd",
    "lane": "ln",
    "court": "ct",
    "place": "pl",
    "apartment": "apt",
    "suite": "ste",
    "north": "n",
    "south": "s",
    "east": "e",
    "west": "w",
    "strasse": "st",
}


def _street_tokens(lines: Iterable[str]) -> set[str]:
    return {_STREET_WORDS.get(t, t) for t in _tokens(lines) if t not in ("unit",)}


def _postal(code: str) -> str:
    p = re.sub(r"[^0-9A-Za-z]", "", code).upper()
    return p[:5] if p.isdigit() and len(p) in (5, 9) else p


def address_similarity(q: Address, c: Address) -> float | None:
    """0-1 over the parts both addresses have (postal code .35, street .35, city .2, state .1); None if none."""
    parts: list[tuple[float, float]] = []
    if q.postal_code and c.postal_code:
        parts.append((0.35, 1.0 if _postal(q.postal_code) == _postal(c.postal_code) else 0.0))
    if q.street and c.street:
        qs, cs = _street_tokens(q.street), _street_tokens(c.street)
        if qs and cs:
            parts.append((0.35, len(qs & cs) / max(len(qs), len(cs))))
    if q.city and c.city:
        qc, cc = fold(q.city), fold(c.city)
        parts.append((0.2, 1.0 if qc == cc or jellyfish.jaro_winkler_similarity(qc, cc) >= 0.92 else 0.0))
    if q.state and c.state:
        parts.append((0.1, 1.0 if fold(q.state) == fold(c.state) else 0.0))
    if not parts:
        return None
    return sum(w * s for w, s in parts) / sum(w for w, _ in parts)


def _best_address(qs: Sequence[Address], cs: Sequence[Address]) -> float | None:
    sims = [s for q in qs for c in cs if (s := address_similarity(q, c)) is not None]
    return max(sims) if sims else None


def normalise_telecom(value: str) -> str:
    """``tel:+1 (555) 010-0100`` → ``5550100100``; ``mailto:A@B.org`` → ``a@b.org``."""
    v = value.strip()
    scheme, sep, rest = v.partition(":")
    if sep and scheme.lower() in ("tel", "fax", "sms", "mailto", "callto"):
        v = rest
    v = v.split(";", 1)[0]  # ;ext=...
    if "@" in v:
        return v.lower()
    digits = re.sub(r"\D", "", v)
    return digits[-10:] if len(digits) > 10 else digits


def telecom_similarity(qs: Sequence[Telecom], cs: Sequence[Telecom]) -> float | None:
    q = {n for t in qs if (n := normalise_telecom(t.value))}
    c = {n for t in cs if (n := normalise_telecom(t.value))}
    if not q or not c:
        return None
    return 1.0 if q & c else 0.0


def _maiden_name_similarity(q: PersonName, c: PersonName) -> float | None:
    qf, qg = _name_parts(q)
    cf, cg = _name_parts(c)
    fam = family_similarity(qf, cf)
    if fam is None:
        return None
    giv = given_similarity(qg, cg)
    return fam if giv is None else 0.7 * fam + 0.3 * giv


def _gender(code: str | None) -> str | None:
    c = (code or "").strip().upper()
    return c if c in ("M", "F") else None


def _candidate_names(candidate: Candidate) -> list[PersonName]:
    names = [PersonName.from_dicom(candidate.record.PatientName)] + list(candidate.extra.names)
    return [n for n in names if not n.is_empty] or [PersonName()]


def local_ids(query: PatientDiscoveryQuery, assigning_authority: str | None, link: IdLink | None = None) -> set[str]:
    """PatientIDs in our domain named by the query: LivingSubjectIds in our authority or mapped by ``link``."""
    aa = bare_oid(assigning_authority) if assigning_authority else None
    found: set[str] = set()
    for ident in query.ids:
        if aa is not None and bare_oid(ident.root) == aa:
            if ident.extension:
                found.add(ident.extension)
        elif link is not None:
            mapped = link(ident)
            if mapped:
                found.add(mapped)
    return found


# -- scoring -------------------------------------------------------------------------------------------


def score_candidate(
    query: PatientDiscoveryQuery,
    candidate: Candidate | PatientRecord,
    *,
    assigning_authority: str | None = None,
    link: IdLink | None = None,
    policy: MatchPolicy | None = None,
) -> CandidateScore:
    """Score one candidate against the query (see the module docstring for the rules)."""
    cand = candidate if isinstance(candidate, Candidate) else Candidate(candidate)
    pol = policy or MatchPolicy()
    w = pol.weights
    rec, extra = cand.record, cand.extra
    components: dict[str, float] = {}
    weights: dict[str, float] = {}
    contradictions: list[str] = []

    # names (core)
    best_pair = (0.0, 0.0)
    if query.names:
        pairs = [_name_pair(q, c, w) for q in query.names for c in _candidate_names(cand)]
        best_pair = max(pairs, key=lambda p: p[0] * w.family + p[1] * w.given)
        if best_pair[0] < 0.5 and any(q.family for q in query.names) and rec.PatientName.split("^")[0].strip():
            contradictions.append("family name differs")
    components["family"], weights["family"] = best_pair[0], w.family
    components["given"], weights["given"] = best_pair[1], w.given

    # birth date (core)
    birth = 0.0
    if query.birth_time is not None:
        sim = birth_date_similarity(query.birth_time, rec.PatientBirthDate)
        if sim is None:
            queried = _describe(query.birth_time)
            contradictions.append(f"birth date {rec.PatientBirthDate} outside the queried {queried}")
            birth = 0.0
        else:
            birth = sim
    components["birth_date"], weights["birth_date"] = birth, w.birth_date

    # gender
    q_gender, c_gender = _gender(query.gender), _gender(rec.PatientSex)
    if q_gender and c_gender:
        components["gender"], weights["gender"] = (1.0 if q_gender == c_gender else 0.0), w.gender
        if q_gender != c_gender:
            contradictions.append(f"gender {c_gender} differs from the queried {q_gender}")

    def optional(name: str, sim: float | None, weight: float) -> None:
        if sim is not None:
            components[name], weights[name] = sim, weight

    optional("address", _best_address(query.addresses, extra.addresses), w.address)
    optional("telecom", telecom_similarity(query.telecoms, extra.telecoms), w.telecom)
    if query.mothers_maiden_names and extra.mothers_maiden_name is not None:
        mmn = extra.mothers_maiden_name
        sims = [s for q in query.mothers_maiden_names if (s := _maiden_name_similarity(q, mmn)) is not None]
        optional("mothers_maiden_name", max(sims) if sims else None, w.mothers_maiden_name)
    if query.birth_place_names and extra.birth_place_name:
        place = fold(extra.birth_place_name)
        hit = any(
            fold(n) == place or jellyfish.jaro_winkler_similarity(fold(n), place) >= 0.92
            for n in query.birth_place_names
        )
        optional("birth_place_name", 1.0 if hit else 0.0, w.birth_place_name)
    if query.birth_place_addresses and extra.birth_place_address is not None:
        optional("birth_place_address", _best_address(query.birth_place_addresses, (extra.birth_place_address,)),
                 w.birth_place_address)
    if query.principal_care_provider_ids and extra.care_provider_ids:
        same = {(bare_oid(i.root), i.extension) for i in query.principal_care_provider_ids} & {
            (bare_oid(i.root), i.extension) for i in extra.care_provider_ids
        }
        optional("care_provider", 1.0 if same else 0.0, w.care_provider)

    # identifiers
    aa = bare_oid(assigning_authority) if assigning_authority else None
    ids = local_ids(query, aa, link)
    comparable = aa is None or rec.IssuerOfPatientID in (None, "") or bare_oid(rec.IssuerOfPatientID or "") == aa
    if ids and comparable:
        if rec.PatientID in ids:
            score = max(0, 100 - 30 * len(contradictions))
            components["id"] = 1.0
            return CandidateScore(cand, score, components, None, id_match=True)
        if pol.id_mismatch_disqualifies:
            return CandidateScore(cand, 0, components, "the queried local patient id names another patient")

    hard = [c for c in contradictions if not c.startswith("family")]
    if hard:
        return CandidateScore(cand, 0, components, "; ".join(hard))
    total = sum(weights.values())
    score = round(100 * sum(components[k] * weights[k] for k in weights) / total) if total else 0
    return CandidateScore(cand, max(0, min(100, score)), components)


def _describe(bt: BirthTime) -> str:
    if bt.value is not None:
        return bt.value
    return f"{bt.low or '…'}..{bt.high or '…'}"


def rank(
    query: PatientDiscoveryQuery,
    candidates: Iterable[Candidate | PatientRecord],
    *,
    assigning_authority: str | None = None,
    link: IdLink | None = None,
    policy: MatchPolicy | None = None,
) -> list[CandidateScore]:
    """Every candidate's score, best first (disqualified ones last, with score 0)."""
    scored = [
        score_candidate(query, c, assigning_authority=assigning_authority, link=link, policy=policy)
        for c in candidates
    ]
    return sorted(scored, key=lambda s: (-s.score, s.candidate.record.PatientID))


# -- decision --------------------------------------------------------------------------------------------


def _known_attributes(query: PatientDiscoveryQuery, cand: Candidate) -> dict[str, object]:
    """Attributes the query did not supply that the candidate has: ActOrderRequired code → comparable value."""
    extra = cand.extra
    known: dict[str, object] = {}
    if _gender(query.gender) is None and _gender(cand.record.PatientSex):
        known[GENDER_REQUESTED] = _gender(cand.record.PatientSex)
    if not query.addresses and extra.addresses:
        known[ADDRESS_REQUESTED] = frozenset(
            (_postal(a.postal_code or ""), frozenset(_street_tokens(a.street))) for a in extra.addresses
        )
    if not query.telecoms and extra.telecoms:
        known[TELECOM_REQUESTED] = frozenset(normalise_telecom(t.value) for t in extra.telecoms)
    if not query.birth_place_names and extra.birth_place_name:
        known[BIRTH_PLACE_NAME_REQUESTED] = fold(extra.birth_place_name)
    if not query.birth_place_addresses and extra.birth_place_address is not None:
        a = extra.birth_place_address
        known[BIRTH_PLACE_ADDRESS_REQUESTED] = (fold(a.city or ""), _postal(a.postal_code or ""))
    if not query.mothers_maiden_names and extra.mothers_maiden_name is not None:
        known[MOTHERS_MAIDEN_NAME_REQUESTED] = " ".join(_tokens(extra.mothers_maiden_name.family))
    return known


_CODE_ORDER = MORE_ATTRIBUTE_CODES


def helpful_attributes(query: PatientDiscoveryQuery, scored: Sequence[CandidateScore]) -> tuple[str, ...]:
    """ActOrderRequired codes worth asking for: attributes the query lacks and the candidates know.

    With several candidates, the attributes whose values tell them apart are preferred.
    """
    per_candidate = [_known_attributes(query, s.candidate) for s in scored]
    known = {code for attrs in per_candidate for code in attrs}
    if len(scored) > 1:
        distinguishing = {
            code
            for code in known
            if len({repr(attrs.get(code)) for attrs in per_candidate}) > 1
        }
        if distinguishing:
            known = distinguishing
    return tuple(c for c in _CODE_ORDER if c in known)


def matched_patient(scored: CandidateScore) -> MatchedPatient:
    """The :class:`MatchedPatient` for a scored candidate (its demographics as we know them)."""
    rec, extra = scored.candidate.record, scored.candidate.extra
    birth: str | None = None
    if rec.PatientBirthDate:
        try:
            birth = parse_date(rec.PatientBirthDate)
        except ValueError:
            birth = None
    names = tuple(n for n in (PersonName.from_dicom(rec.PatientName), *extra.names) if not n.is_empty)
    return MatchedPatient(
        patient_id=rec.PatientID,
        score=scored.score,
        demographics=PatientDemographics(
            names=names,
            gender=rec.PatientSex or None,
            birth_time=birth,
            addresses=extra.addresses,
            telecoms=extra.telecoms,
            ids=extra.other_ids,
            mothers_maiden_name=extra.mothers_maiden_name,
            birth_place_name=extra.birth_place_name,
            birth_place_address=extra.birth_place_address,
        ),
    )


def decide(
    query: PatientDiscoveryQuery,
    candidates: Iterable[Candidate | PatientRecord],
    policy: MatchPolicy | None = None,
    *,
    assigning_authority: str | None = None,
    link: IdLink | None = None,
) -> Decision:
    """Score the candidates and choose the ITI-55 outcome (see the module docstring)."""
    pol = policy or MatchPolicy()
    scored = [
        s
        for s in rank(query, candidates, assigning_authority=assigning_authority, link=link, policy=pol)
        if s.disqualified is None and s.score > 0
    ]
    above = [s for s in scored if s.score >= pol.threshold]
    if len(above) == 1:
        return Matches((matched_patient(above[0]),))
    if above:
        if pol.multiple == "ask-more":
            if above[0].score - above[1].score >= pol.clear_margin:
                return Matches((matched_patient(above[0]),))
            codes = helpful_attributes(query, above)
            return MoreAttributesRequested(codes) if codes else NoMatch()
        if len(above) > pol.max_results:
            codes = helpful_attributes(query, above)
            if codes:
                return MoreAttributesRequested(codes)
        return Matches(tuple(matched_patient(s) for s in above[: pol.max_results]))
    low, high = pol.ask_more_band
    near = [s for s in scored if low <= s.score < high]
    if near:
        codes = helpful_attributes(query, near)
        if codes:
            return MoreAttributesRequested(codes)
    return NoMatch()


# -- candidate pre-selection -----------------------------------------------------------------------------


def _family_prefix(query: PatientDiscoveryQuery, length: int) -> str | None:
    prefixes: set[str] = set()
    for name in query.names:
        if not name.family:  # given names only, or an unstructured name whose family part is unknown
            return None
        raw = " ".join(name.family).strip()
        if not raw:
            return None
        if not raw[0].isascii():
            return None
        tokens = _tokens(name.family)
        if not tokens:
            return None
        prefixes.add(tokens[0][:length].upper())
    return prefixes.pop() if len(prefixes) == 1 else None


def _iso(d: date) -> str:
    return d.strftime("%Y%m%d")


def candidate_query(
    query: PatientDiscoveryQuery,
    *,
    assigning_authority: str | None = None,
    link: IdLink | None = None,
    family_prefix_length: int = 1,
) -> PatientQuery:
    """The loose demographic pre-selection for ``query`` (ids only when it has no name and no birth date)."""
    if query.birth_time is not None:
        lo, hi = query.birth_time.bounds()
        return PatientQuery(
            birth_date_from=_iso(date(lo.year, 1, 1)) if lo != date.min else None,
            birth_date_to=_iso(date(hi.year, 12, 31)) if hi != date.max else None,
        )
    if query.names:
        return PatientQuery(family=_family_prefix(query, family_prefix_length))
    return PatientQuery(patient_ids=tuple(sorted(local_ids(query, assigning_authority, link))))


def candidate_queries(
    query: PatientDiscoveryQuery,
    *,
    assigning_authority: str | None = None,
    link: IdLink | None = None,
    family_prefix_length: int = 1,
) -> list[PatientQuery]:
    """Every pre-selection to run (their results are united): by local ids, then by demographics."""
    queries: list[PatientQuery] = []
    ids = tuple(sorted(local_ids(query, assigning_authority, link)))
    if ids:
        queries.append(PatientQuery(patient_ids=ids))
    if query.birth_time is not None or query.names:
        demographic = candidate_query(
            query, assigning_authority=assigning_authority, link=link, family_prefix_length=family_prefix_length
        )
        if demographic != PatientQuery():  # never scan the whole PACS (only possible without a birth date)
            queries.append(demographic)
    return queries


async def find_candidates(
    backend: PacsBackend,
    query: PatientDiscoveryQuery,
    *,
    assigning_authority: str | None = None,
    link: IdLink | None = None,
    identities: IdentitySource | None = None,
) -> list[Candidate]:
    """Run :func:`candidate_queries` against the PACS, de-duplicate, attach identity-table demographics.

    :class:`~gateway.pacs.base.PacsError` propagates (the service answers AE / ResponderBusy or InternalError).
    """
    seen: dict[tuple[str, str | None], PatientRecord] = {}
    for pq in candidate_queries(query, assigning_authority=assigning_authority, link=link):
        for record in await backend.find_patients(pq):
            seen.setdefault((record.PatientID, record.IssuerOfPatientID), record)
    candidates: list[Candidate] = []
    for record in seen.values():
        extra = identities(record) if identities is not None else None
        candidates.append(Candidate(record, extra or Demographics()))
    return candidates


async def match_patients(
    backend: PacsBackend,
    query: PatientDiscoveryQuery,
    policy: MatchPolicy | None = None,
    *,
    assigning_authority: str,
    link: IdLink | None = None,
    identities: IdentitySource | None = None,
) -> Decision:
    """:func:`find_candidates` then :func:`decide`: the whole matching step of the responding service."""
    candidates = await find_candidates(
        backend, query, assigning_authority=assigning_authority, link=link, identities=identities
    )
    return decide(query, candidates, policy, assigning_authority=assigning_authority, link=link)
