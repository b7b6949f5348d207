"""ITI-55 scenarios: the partner plays Responding Gateway for the test patient and derived queries."""

from __future__ import annotations

from collections.abc import Collection

from conformance import spec
from conformance.checks.xcpd import case_check, demographics_check, request_ids, response_checks
from conformance.context import Scenario, ScenarioContext
from conformance.prerequisites import discovery_request, remember_match
from conformance.scenarios.common import judge
from gateway.ihe import iti55
from gateway.ihe.iti55 import PatientDemographics, PatientDiscoveryResult
from gateway.initiating.partners import ITI55

#: a patient nobody holds (no plausible phonetic neighbour, a birth date long past)
NOBODY_FAMILY, NOBODY_GIVEN, NOBODY_BIRTH_DATE = "Xqzvrtwy", "Nomatch", "19010101"


async def discover(ctx: ScenarioContext, demographics: PatientDemographics, expected: Collection[int], *,
                   why: str = "") -> PatientDiscoveryResult | None:
    """Send one XCPD query and judge the answer: framing, schema, structure and the expected case(s)."""
    body = discovery_request(ctx, demographics)
    message_id, query_id = request_ids(body)
    sent = await ctx.send(ITI55, body)
    if not judge(ctx, sent) or sent.reply is None:
        return None
    try:
        result = iti55.parse_response(sent.reply.body)
    except iti55.Iti55ResponseError as exc:
        ctx.check("xcpd.readable", "xcpd", "the answer is a readable PRPA_IN201306UV02", spec.XCPD_RESPONSE, False,
                  str(exc))
        return None
    ctx.add(response_checks(result, sent.reply.body, message_id=message_id, query_id=query_id))
    ctx.add([case_check(result, expected, why=why)])
    return result


async def match(ctx: ScenarioContext) -> None:
    result = await discover(ctx, ctx.session.patient.demographics(), {1},
                            why="the query carries the test patient's full demographics")
    if result is not None and result.patients:
        ctx.add([demographics_check(result.patients, ctx.session.patient)])
        remember_match(ctx, result)


async def no_match(ctx: ScenarioContext) -> None:
    p = ctx.session.patient
    nobody = p.demographics(family=NOBODY_FAMILY, given=NOBODY_GIVEN, birth_date=NOBODY_BIRTH_DATE)
    await discover(ctx, nobody, {4}, why="nobody with these demographics exists")


async def multiple(ctx: ScenarioContext) -> None:
    p = ctx.session.patient
    result = await discover(
        ctx, p.demographics(given=p.given[:1]), {2, 3},
        why=f"the test data holds two patients {p.family.upper()}^{p.given[:1]}* born {p.birth_date}: a single match "
            "would be a guess")
    if result is not None and result.patients:
        ctx.add([demographics_check(result.patients, p)])


async def ask_more(ctx: ScenarioContext) -> None:
    p = ctx.session.patient
    await discover(ctx, p.demographics(birth_date=p.birth_date[:4], gender=False), {3},
                   why="only the birth year and no gender are given, too little for a confident match "
                       f"({spec.XCPD_MATCHING}); a partner that never asks for more should leave this scenario out")


SCENARIOS = (
    Scenario("xcpd-match", "XCPD: the test patient is found (Case 1)", f"{spec.XCPD_CASES} Case 1; {spec.XCPD_HCID}",
             (ITI55,), "Full demographics of the test patient: exactly one match, with one Patient.id, its "
             "custodian community and the queried demographics; the ids are echoed.", match, "XCPD"),
    Scenario("xcpd-no-match", "XCPD: an unknown patient is not found (Case 4)", f"{spec.XCPD_CASES} Case 4",
             (ITI55,), "Demographics nobody holds: AA / NF without registrationEvent.", no_match, "XCPD"),
    Scenario("xcpd-multiple", "XCPD: an ambiguous query lists several patients (Case 2)",
             f"{spec.XCPD_CASES} Case 2/3", (ITI55,),
             "Family name, birth date, gender and only the given name's initial: the test data holds two such "
             "patients, so the answer lists both (Case 2) or asks for more attributes (Case 3), never one guess.",
             multiple, "XCPD"),
    Scenario("xcpd-ask-more", "XCPD: a weak query is answered with a request for more attributes (Case 3)",
             f"{spec.XCPD_CASES} Case 3; {spec.XCPD_DETECTED_ISSUE}", (ITI55,),
             "Name and birth year only, no gender: AA / OK without a match and with ActOrderRequired codes from "
             "1.3.6.1.4.1.19376.1.2.27.1.", ask_more, "XCPD"),
)
