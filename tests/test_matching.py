"""Demographic matching of the responding gateway (gateway.responding.matching)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

import pytest
from lxml import etree

from gateway.ihe import iti55
from gateway.ihe.iti55 import (
    ADDRESS_REQUESTED,
    BIRTH_PLACE_NAME_REQUESTED,
    GENDER_REQUESTED,
    II,
    MOTHERS_MAIDEN_NAME_REQUESTED,
    TELECOM_REQUESTED,
    Address,
    BirthTime,
    Matches,
    MoreAttributesRequested,
    NoMatch,
    PatientDiscoveryQuery,
    PersonName,
    Telecom,
)
from gateway.pacs.base import PacsBackend, PacsError, PatientQuery, PatientRecord
from gateway.responding import matching
from gateway.responding.matching import Candidate, Demographics, MatchPolicy
from gateway.soap.schema import default_schemas
from tests.conftest import SAMPLES

AA = "2.999.1.1"
#: a real queryByParameter to echo (the responses built in the table must validate)
QBP = iti55.parse_request(
    etree.parse(str(SAMPLES / "messages/iti55-xcpd/ipf/iti55-sample-request.xml")).getroot()
).query_by_parameter
SSN = "2.16.840.1.113883.4.1"


def name(family: str | tuple[str, ...], *given: str) -> PersonName:
    return PersonName(family=(family,) if isinstance(family, str) else family, given=given)


def query(
    *names: PersonName,
    birth: str | BirthTime | None = None,
    gender: str | None = None,
    ids: Sequence[II] = (),
    **kw: Any,
) -> PatientDiscoveryQuery:
    return PatientDiscoveryQuery(
        message_id=II("1.2.3.4", "m1"),
        sender_device_id=II("1.2.3.4.9"),
        query_id=II("1.2.3.4", "q1"),
        query_by_parameter=QBP,
        names=names,
        birth_time=BirthTime(birth) if isinstance(birth, str) else birth,
        gender=gender,
        ids=tuple(ids),
        **kw,
    )


def rec(pid: str, pn: str, dob: str = "", sex: str = "", issuer: str | None = None) -> PatientRecord:
    return PatientRecord(PatientID=pid, IssuerOfPatientID=issuer, PatientName=pn, PatientBirthDate=dob, PatientSex=sex)


SMITH = rec("P1", "SMITH^JOHN", "19630805", "M")
HOME = Address(("1 Main Street",), "Springfield", "IL", "62701", "US")
OTHER_HOME = Address(("99 Elm Avenue",), "Shelbyville", "IL", "62565", "US")


@dataclass
class Case:
    q: PatientDiscoveryQuery
    candidates: list[Candidate | PatientRecord]
    #: "match" (ids), "more" (codes) or "none"
    decision: str
    expected: tuple[str, ...] = ()
    #: approximate score of each candidate, in the order given (± 2)
    scores: tuple[int, ...] = ()
    policy: MatchPolicy = field(default_factory=MatchPolicy)
    link: matching.IdLink | None = None


CASES: dict[str, Case] = {
    "exact": Case(query(name("Smith", "John"), birth="19630805", gender="M"), [SMITH], "match", ("P1",), (100,)),
    "accents and case": Case(
        query(name("Müller", "José"), birth="19800101", gender="M"),
        [rec("P2", "MULLER^JOSE", "19800101", "M")], "match", ("P2",), (100,)),
    "umlaut transcribed": Case(
        query(name("Müller", "José"), birth="19800101", gender="M"),
        [rec("P2", "MUELLER^JOSE", "19800101", "M")], "match", ("P2",), (97,)),
    "phonetic Smyth": Case(
        query(name("Smith", "John"), birth="19630805", gender="M"),
        [rec("P3", "Smyth^John", "19630805", "M")], "match", ("P3",), (97,)),
    "hyphenated family": Case(
        query(name("Müller-Lüdenscheidt", "Anna"), birth="19700312", gender="F"),
        [rec("P4", "Mueller Luedenscheidt^Anna", "19700312", "F")], "match", ("P4",), (97,)),
    "double family, one part on file": Case(
        query(name(("García", "López"), "María"), birth="19750615", gender="F"),
        [rec("P5", "Garcia^Maria", "19750615", "F")], "match", ("P5",), (98,)),
    "O'Brien punctuation": Case(
        query(name("O'Brien", "Seán"), birth="19550101", gender="M"),
        [rec("P6", "OBRIEN^SEAN", "19550101", "M")], "match", ("P6",), (100,)),
    "swapped given names": Case(
        query(name("Schmidt", "Maria", "Anna"), birth="19750615", gender="F"),
        [rec("P7", "Schmidt^Anna^Maria", "19750615", "F")], "match", ("P7",), (99,)),
    "family and given swapped": Case(
        query(name("John", "Smith"), birth="19630805", gender="M"), [SMITH], "match", ("P1",), (95,)),
    "given initial": Case(
        query(name("Smith", "J"), birth="19630805", gender="M"), [SMITH], "match", ("P1",), (94,)),
    "nickname prefix": Case(
        query(name("Jones", "Jim"), birth="19630805", gender="M"),
        [rec("P8", "Jones^Jimmy", "19630805", "M")], "match", ("P8",), (98,)),
    "partial birth date YYYYMM": Case(
        query(name("Smith", "John"), birth="196308", gender="M"), [SMITH], "match", ("P1",), (91,)),
    "partial birth date YYYY asks for more": Case(
        query(name("Smith", "John"), birth="1963", gender="M"),
        [Candidate(SMITH, Demographics(addresses=(HOME,)))], "more", (ADDRESS_REQUESTED,), (82,)),
    "birth date range": Case(
        query(name("Smith", "John"), birth=BirthTime(low="19630801", high="19630831"), gender="M"),
        [SMITH], "match", ("P1",), (91,)),
    "birth date outside range": Case(
        query(name("Smith", "John"), birth=BirthTime(low="19640101", high="19641231"), gender="M"),
        [SMITH], "none", (), (0,)),
    "different birth date disqualifies": Case(
        query(name("Smith", "John"), birth="19720115", gender="M"), [SMITH], "none", (), (0,)),
    "wrong gender disqualifies": Case(
        query(name("Smith", "John"), birth="19630805", gender="F"), [SMITH], "none", (), (0,)),
    "unknown gender is neutral": Case(
        query(name("Smith", "John"), birth="19630805", gender="UN"), [SMITH], "match", ("P1",), (100,)),
    "id-only query": Case(query(ids=[II(AA, "P1")]), [SMITH], "match", ("P1",), (100,)),
    "id in urn:oid form with a matching name": Case(
        query(name("Smith", "John"), ids=[II(f"urn:oid:{AA}", "P1")]), [SMITH], "match", ("P1",), (100,)),
    "id with contradicting gender is not decisive": Case(
        query(name("Smith", "John"), birth="19630805", gender="F", ids=[II(AA, "P1")]),
        [SMITH], "none", (), (70,)),
    "local id naming another patient disqualifies": Case(
        query(name("Smith", "John"), birth="19630805", gender="M", ids=[II(AA, "P9")]), [SMITH], "none", (), (0,)),
    "id in another authority is ignored": Case(
        query(ids=[II(SSN, "123-45-6789")]), [SMITH], "none", (), (0,)),
    "id in another authority mapped by the link table": Case(
        query(ids=[II(SSN, "123-45-6789")]), [SMITH], "match", ("P1",), (100,),
        link=lambda i: "P1" if i == II(SSN, "123-45-6789") else None),
    "same name and birth date, policy list": Case(
        query(name("Smith", "John"), birth="19630805", gender="M"),
        [SMITH, rec("P2", "Smith^John", "19630805", "M")], "match", ("P1", "P2"), (100, 100)),
    "same name and birth date, policy ask-more": Case(
        query(name("Smith", "John"), birth="19630805", gender="M"),
        [Candidate(SMITH, Demographics(addresses=(HOME,), telecoms=(Telecom("tel:217-555-0100"),))),
         Candidate(rec("P2", "Smith^John", "19630805", "M"), Demographics(addresses=(OTHER_HOME,)))],
        "more", (ADDRESS_REQUESTED, TELECOM_REQUESTED), (100, 100), MatchPolicy(multiple="ask-more")),
    "same name and birth date, ask-more, nothing to tell them apart": Case(
        query(name("Smith", "John"), birth="19630805", gender="M"),
        [SMITH, rec("P2", "Smith^John", "19630805", "M")], "none", (), (100, 100), MatchPolicy(multiple="ask-more")),
    "ask-more with a clear winner": Case(
        query(name("Smith", "John"), birth="19630805", gender="M"),
        [SMITH, rec("P2", "Smith^J", "19630805", "M")], "match", ("P1",), (100, 94),
        MatchPolicy(multiple="ask-more", clear_margin=5)),
    "below threshold asks for the attributes the candidate knows": Case(
        query(name("Smith"), birth="19630805"),
        [Candidate(SMITH, Demographics(telecoms=(Telecom("tel:+1-217-555-0100"),)))],
        "more", (GENDER_REQUESTED, TELECOM_REQUESTED), (77,)),
    "below threshold with nothing to ask": Case(
        query(name("Smith"), birth="19630805", gender="M"), [SMITH], "none", (), (79,)),
    "candidate without birth date": Case(
        query(name("Smith", "John"), birth="19630805", gender="M"),
        [Candidate(rec("P1", "SMITH^JOHN", "", "M"), Demographics(addresses=(HOME,)))],
        "more", (ADDRESS_REQUESTED,), (82,)),
    "birth date typo": Case(
        query(name("Jones", "James"), birth="19630805", gender="M"),
        [Candidate(rec("P8", "Jones^James", "19630804", "M"), Demographics(addresses=(HOME,)))],
        "more", (ADDRESS_REQUESTED,), (82,)),
    "birth date typo confirmed by address and telephone": Case(
        query(name("Jones", "James"), birth="19630805", gender="M", addresses=(HOME,),
              telecoms=(Telecom("tel:(217) 555-0100"),)),
        [Candidate(rec("P8", "Jones^James", "19630804", "M"),
                   Demographics(addresses=(replace(HOME, street=("1 MAIN ST",), postal_code="62701-1234"),),
                                telecoms=(Telecom("tel:+1-217-555-0100", "HP"),)))],
        "match", ("P8",), (86,)),
    "day and month swapped": Case(
        query(name("Smith", "John"), birth="19630508", gender="M"), [SMITH], "none", (), (82,)),
    "different address lowers the score": Case(
        query(name("Smith", "John"), birth="19630805", gender="M", addresses=(OTHER_HOME,)),
        [Candidate(SMITH, Demographics(addresses=(HOME,)))], "match", ("P1",), (86,)),
    "mother's maiden name contradicts: lower, still a match": Case(
        query(name("Smith", "John"), birth="19630805", gender="M", mothers_maiden_names=(name("Miller", "Anne"),)),
        [Candidate(SMITH, Demographics(mothers_maiden_name=name("Karlsson", "Inga")))], "match", ("P1",), (90,)),
    "mother's maiden name confirms": Case(
        query(name("Smith", "John"), birth="19630805", gender="M", mothers_maiden_names=(name("Miller"),)),
        [Candidate(SMITH, Demographics(mothers_maiden_name=name("Müller", "Anne")))], "match", ("P1",), (99,)),
    "different family name (marriage?) asks for more": Case(
        query(name("Smith", "Mary"), birth="19700101", gender="F"),
        [Candidate(rec("P9", "Johnson^Mary", "19700101", "F"), Demographics(addresses=(HOME,)))],
        "more", (ADDRESS_REQUESTED,), (68,)),
    "unrelated patient": Case(
        query(name("Nguyen", "Anh"), birth="19630805", gender="M"),
        [rec("P1", "Newton^Andrew", "19630805", "M")], "none", (), (47,)),
    "no candidate at all": Case(query(name("Smith", "John"), birth="19630805", gender="M"), [], "none"),
    "several query names are OR'ed": Case(
        query(name("Smith", "Mary"), name("Johnson", "Mary"), birth="19700101", gender="F"),
        [rec("P9", "Johnson^Mary", "19700101", "F")], "match", ("P9",), (100,)),
    "alias in the identity table": Case(
        query(name("Johnson", "Mary"), birth="19700101", gender="F"),
        [Candidate(rec("P9", "Smith^Mary", "19700101", "F"), Demographics(names=(name("Johnson", "Mary"),)))],
        "match", ("P9",), (100,)),
}


@pytest.mark.parametrize("label", list(CASES))
def test_matching_table(label: str) -> None:
    case = CASES[label]
    ranked = {
        s.candidate.record.PatientID: s
        for s in matching.rank(case.q, case.candidates, assigning_authority=AA, link=case.link, policy=case.policy)
    }
    ids = [c.record.PatientID if isinstance(c, Candidate) else c.PatientID for c in case.candidates]
    actual = tuple(ranked[i].score for i in ids)
    assert all(abs(a - e) <= 2 for a, e in zip(actual, case.scores, strict=True)), (actual, case.scores)

    decision = matching.decide(case.q, case.candidates, case.policy, assigning_authority=AA, link=case.link)
    if case.decision == "match":
        assert isinstance(decision, Matches), decision
        assert tuple(p.patient_id for p in decision.patients) == case.expected
    elif case.decision == "more":
        assert isinstance(decision, MoreAttributesRequested), decision
        assert decision.codes == case.expected
    else:
        assert isinstance(decision, NoMatch), decision

    # whatever the decision, the response built from it is valid
    response = iti55.build_response(case.q, decision, responder_device_id="2.999.1.9",
                                    home_community_id="urn:oid:2.999.1", assigning_authority=AA)
    assert default_schemas().errors(response) == []


def test_disqualification_reasons_and_components() -> None:
    s = matching.score_candidate(query(name("Smith", "John"), birth="19630805", gender="F"), SMITH)
    assert s.score == 0 and s.disqualified is not None and "gender" in s.disqualified
    s = matching.score_candidate(query(name("Smith", "John"), birth="19720115"), SMITH)
    assert s.disqualified is not None and "birth date 19630805 outside the queried 19720115" in s.disqualified
    s = matching.score_candidate(query(name("Smith", "John"), birth="19630805", gender="M"), SMITH)
    assert s.disqualified is None and dict(s.components) == {"family": 1, "given": 1, "birth_date": 1, "gender": 1}
    s = matching.score_candidate(query(ids=[II(AA, "P1")]), SMITH, assigning_authority=AA)
    assert s.id_match and s.score == 100


def test_id_of_another_issuer_is_not_compared() -> None:
    other_issuer = rec("P1", "SMITH^JOHN", "19630805", "M", issuer="9.9.9")
    s = matching.score_candidate(query(ids=[II(AA, "P1")]), other_issuer, assigning_authority=AA)
    assert not s.id_match and s.score == 0
    same_issuer = replace(other_issuer, IssuerOfPatientID=f"urn:oid:{AA}")
    assert matching.score_candidate(query(ids=[II(AA, "P1")]), same_issuer, assigning_authority=AA).id_match


def test_id_mismatch_policy_can_be_relaxed() -> None:
    q = query(name("Smith", "John"), birth="19630805", gender="M", ids=[II(AA, "P9")])
    relaxed = MatchPolicy(id_mismatch_disqualifies=False)
    decision = matching.decide(q, [SMITH], relaxed, assigning_authority=AA)
    assert isinstance(decision, Matches) and decision.patients[0].score == 100


def test_max_results() -> None:
    q = query(name("Smith", "John"), birth="19630805", gender="M")
    same = [rec(f"P{i}", "Smith^John", "19630805", "M") for i in range(7)]
    decision = matching.decide(q, same, MatchPolicy(max_results=3))
    assert isinstance(decision, Matches) and [p.patient_id for p in decision.patients] == ["P0", "P1", "P2"]
    with_data = [Candidate(r, Demographics(telecoms=(Telecom(f"tel:555-010{i}"),))) for i, r in enumerate(same)]
    assert matching.decide(q, with_data, MatchPolicy(max_results=3)) == MoreAttributesRequested((TELECOM_REQUESTED,))


def test_helpful_attributes_prefers_distinguishing_ones() -> None:
    q = query(name("Smith", "John"), birth="19630805")
    a = Candidate(SMITH, Demographics(addresses=(HOME,), birth_place_name="Paris",
                                      mothers_maiden_name=name("Miller")))
    b = Candidate(rec("P2", "Smith^John", "19630805", "M"),
                  Demographics(addresses=(HOME,), birth_place_name="Lyon", mothers_maiden_name=name("Miller")))
    scored = matching.rank(q, [a, b])
    assert matching.helpful_attributes(q, scored) == (BIRTH_PLACE_NAME_REQUESTED,)
    assert matching.helpful_attributes(q, scored[:1]) == (
        GENDER_REQUESTED, ADDRESS_REQUESTED, BIRTH_PLACE_NAME_REQUESTED, MOTHERS_MAIDEN_NAME_REQUESTED,
    )


def test_matched_patient_carries_known_demographics() -> None:
    extra = Demographics(addresses=(HOME,), telecoms=(Telecom("tel:+1-217-555-0100", "HP"),),
                         other_ids=(II(SSN, "123-45-6789"),), names=(name("Smyth", "Jack"),))
    decision = matching.decide(query(name("Smith", "John"), birth="19630805", gender="M"), [Candidate(SMITH, extra)])
    assert isinstance(decision, Matches)
    (p,) = decision.patients
    assert (p.patient_id, p.score) == ("P1", 100)
    assert p.demographics.names == (name("SMITH", "JOHN"), name("Smyth", "Jack"))
    assert (p.demographics.gender, p.demographics.birth_time) == ("M", "19630805")
    assert p.demographics.addresses == (HOME,) and p.demographics.ids == (II(SSN, "123-45-6789"),)


def test_policy_validation() -> None:
    with pytest.raises(ValueError):
        MatchPolicy(threshold=0)
    with pytest.raises(ValueError):
        MatchPolicy(threshold=80, ask_more_band=(60, 90))
    with pytest.raises(ValueError):
        MatchPolicy(max_results=0)
    with pytest.raises(ValueError):
        MatchPolicy(multiple="all")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("a", "b", "low", "high"),
    [
        ("José Müller", "JOSE MULLER", 1.0, 1.0),
        ("smith", "smyth", 0.9, 0.9),
        ("catherine", "katherine", 0.9, 0.9),
        ("smith", "schmidt", 0.0, 0.0),
        ("jones", "johnson", 0.0, 0.0),
    ],
)
def test_name_similarity_primitives(a: str, b: str, low: float, high: float) -> None:
    sim = matching.family_similarity([a], [b])
    assert sim is not None and low <= sim <= high


def test_fold_and_normalise() -> None:
    assert matching.fold("  José O'Brien-Müller ß Øystein ") == "jose obrien muller ss oystein"
    assert matching.normalise_telecom("tel:+1 (217) 555-0100;ext=12") == "2175550100"
    assert matching.normalise_telecom("mailto:John@Example.ORG") == "john@example.org"
    assert matching.address_similarity(HOME, replace(HOME, street=("1 Main St",))) == 1.0
    assert matching.address_similarity(Address(country="US"), HOME) is None


# ------------------------------------------------------------------------------------------ pre-selection


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        (query(name("Smith", "John"), birth="19630805"), PatientQuery(birth_date_from="19630101",
                                                                       birth_date_to="19631231")),
        (query(name("Smith"), birth="196308"), PatientQuery(birth_date_from="19630101", birth_date_to="19631231")),
        (query(name("Smith"), birth=BirthTime(low="1960", high="196502")),
         PatientQuery(birth_date_from="19600101", birth_date_to="19651231")),
        (query(name("Smith"), birth=BirthTime(low="19600315")), PatientQuery(birth_date_from="19600101")),
        (query(name("smith", "John")), PatientQuery(family="S")),
        (query(name("Smith"), name("Smyth")), PatientQuery(family="S")),
        (query(name("Smith"), name("Jones")), PatientQuery()),
        (query(name("Ölmez", "Ayşe")), PatientQuery()),
        (query(PersonName(given=("John",))), PatientQuery()),
        (query(PersonName(text="John Smith")), PatientQuery()),
        (query(ids=[II(AA, "P1"), II(SSN, "1")]), PatientQuery(patient_ids=("P1",))),
    ],
)
def test_candidate_query(q: PatientDiscoveryQuery, expected: PatientQuery) -> None:
    assert matching.candidate_query(q, assigning_authority=AA) == expected


def test_candidate_query_family_prefix_length() -> None:
    q = query(name("Smith", "John"))
    assert matching.candidate_query(q, family_prefix_length=2) == PatientQuery(family="SM")


def test_candidate_queries_unite_ids_and_demographics() -> None:
    q = query(name("Smith", "John"), birth="19630805", ids=[II(AA, "P1"), II(SSN, "123")])
    assert matching.candidate_queries(q, assigning_authority=AA, link=lambda i: "P7" if i.root == SSN else None) == [
        PatientQuery(patient_ids=("P1", "P7")),
        PatientQuery(birth_date_from="19630101", birth_date_to="19631231"),
    ]
    assert matching.candidate_queries(query(ids=[II(SSN, "123")]), assigning_authority=AA) == []
    # no birth date and names with different initials: no full scan, ids only
    assert matching.candidate_queries(query(name("Smith"), name("Jones"), ids=[II(AA, "P1")]),
                                      assigning_authority=AA) == [PatientQuery(patient_ids=("P1",))]


class FakePacs:
    """Answers find_patients like a loose backend: AND of the given criteria, family as a prefix."""

    source_id = "2.999.1.3"

    def __init__(self, records: list[PatientRecord], fail: bool = False) -> None:
        self.records = records
        self.fail = fail
        self.queries: list[PatientQuery] = []

    async def find_patients(self, q: PatientQuery) -> list[PatientRecord]:
        self.queries.append(q)
        if self.fail:
            raise PacsError("PACS unreachable")
        out = []
        for r in self.records:
            if q.patient_ids and r.PatientID not in q.patient_ids:
                continue
            if q.family and not matching.fold(r.PatientName.split("^")[0]).upper().startswith(q.family):
                continue
            if q.birth_date_from and not (r.PatientBirthDate and r.PatientBirthDate >= q.birth_date_from):
                continue
            if q.birth_date_to and not (r.PatientBirthDate and r.PatientBirthDate <= q.birth_date_to):
                continue
            out.append(r)
        return out


RECORDS = [
    SMITH,
    rec("P2", "Smyth^Jon", "19630805", "M"),
    rec("P3", "Jones^Jimmy", "19630805", "M"),
    rec("P4", "Smith^John", "19720115", "M"),
]


async def test_find_candidates_unites_and_attaches_identities() -> None:
    pacs = FakePacs(RECORDS)
    q = query(name("Smith", "John"), birth="19630805", gender="M", ids=[II(AA, "P4")])
    found = await matching.find_candidates(
        cast(PacsBackend, pacs), q, assigning_authority=AA,
        identities=lambda r: Demographics(addresses=(HOME,)) if r.PatientID == "P1" else None,
    )
    assert [c.record.PatientID for c in found] == ["P4", "P1", "P2", "P3"]
    assert found[1].extra.addresses == (HOME,) and found[0].extra == Demographics()
    assert pacs.queries == [
        PatientQuery(patient_ids=("P4",)),
        PatientQuery(birth_date_from="19630101", birth_date_to="19631231"),
    ]


async def test_match_patients_end_to_end() -> None:
    pacs = cast(PacsBackend, FakePacs(RECORDS))
    q = query(name("Smith", "John"), birth="19630805", gender="M")
    decision = await matching.match_patients(pacs, q, assigning_authority=AA)
    assert isinstance(decision, Matches)
    assert [(p.patient_id, p.score) for p in decision.patients] == [("P1", 100), ("P2", 95)]
    strict = await matching.match_patients(pacs, q, MatchPolicy(multiple="ask-more"), assigning_authority=AA)
    assert isinstance(strict, NoMatch)  # two candidates, nothing to ask that would tell them apart
    by_name_only = await matching.match_patients(pacs, query(name("Jones", "Jimmy"), gender="M"),
                                                 assigning_authority=AA)
    assert isinstance(by_name_only, NoMatch)  # no birth date: at most 63, nothing to ask


async def test_pacs_error_propagates() -> None:
    with pytest.raises(PacsError):
        await matching.match_patients(cast(PacsBackend, FakePacs([], fail=True)), query(name("Smith")),
                                      assigning_authority=AA)
