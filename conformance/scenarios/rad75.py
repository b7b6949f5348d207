"""RAD-75 scenarios: the images a retrieved KOS references, in every shape a partner will ask for them."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Sequence
from itertools import count

from conformance import spec
from conformance.checks.rad75 import ImageItem, delivery_checks
from conformance.checks.retrieve import refusal_checks
from conformance.context import Scenario, ScenarioContext
from conformance.prerequisites import manifests
from conformance.scenarios.common import judge, unexpected_body
from conformance.session import Manifest, Sent
from gateway.errors import SoapFault
from gateway.ihe import rad75
from gateway.ihe.iti39 import RetrieveResult
from gateway.ihe.registry import RegistryErrorCode
from gateway.initiating.partners import ITI38, ITI39, ITI55, RAD75
from gateway.soap import mtom

EVRLE = rad75.EXPLICIT_VR_LITTLE_ENDIAN
IVRLE = rad75.IMPLICIT_VR_LITTLE_ENDIAN
#: what every DICOM application can decode
DEFAULT_SYNTAXES = (EVRLE, IVRLE)
#: a conformance request needs no more instances than this
MAX_ITEMS = 40
PREREQUISITES = (RAD75, ITI39, ITI38, ITI55)
_serial = count(1)


def items_of(manifest: Manifest, series_limit: int | None = None) -> list[list[ImageItem]]:
    """The manifest's instances as RAD-75 items, one list per series (KOS order)."""
    home = manifest.request.home_community_id or ""
    out = []
    for g in manifest.kos.plan()[:series_limit]:
        out.append([ImageItem(home, g.retrieve_location_uid, g.study_uid, g.series_uid, r.sop_class_uid,
                              r.sop_instance_uid) for r in g.references])
    return out


def _cap(ctx: ScenarioContext) -> int:
    return max(1, min(MAX_ITEMS, ctx.session.partner.max_documents_per_request))


def spread(series: Sequence[Sequence[ImageItem]], limit: int) -> list[ImageItem]:
    """At most ``limit`` items, taken round-robin over the series so that every series is represented."""
    out: list[ImageItem] = []
    depth = 0
    while len(out) < limit and any(depth < len(s) for s in series):
        out.extend(s[depth] for s in series if depth < len(s))
        depth += 1
    return out[:limit]


def unknown_uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


async def retrieve(ctx: ScenarioContext, items: Sequence[ImageItem], syntaxes: Sequence[str], *, label: str = "",
                   ) -> RetrieveResult | None:
    """One RAD-75 request for ``items``; instances stream to files under the scenario's work folder. The
    SOAP / schema checks are added; the parsed answer is returned when there is one."""
    request = rad75.imaging_request([(i.study_uid, i.series_uid, i.request) for i in items], syntaxes)
    folder = ctx.workdir / f"rad75-{next(_serial)}"
    folder.mkdir(parents=True, exist_ok=True)
    sent = await ctx.send(RAD75, rad75.build_request(request), whole_deadline=False,
                          sink_factory=lambda _info: mtom.FileSink(folder, durable=False))
    ctx.session.notes.setdefault("rad75_folders", []).append(folder)
    return _result(ctx, sent, label)


def _result(ctx: ScenarioContext, sent: Sent, label: str) -> RetrieveResult | None:
    if not judge(ctx, sent, label=label) or sent.reply is None:
        return None
    body = sent.reply.body
    try:
        if isinstance(body.tag, str) and body.tag.endswith("}RetrieveDocumentSetResponse"):
            return rad75.parse_response(body, sent.reply.attachments)
        problem = unexpected_body(sent, "RetrieveDocumentSetResponse")
    except SoapFault as exc:
        problem = exc.reason
    ctx.check("rad75.readable", "rad75", "the answer is a RetrieveDocumentSetResponse whose parts resolve",
              spec.RAD75_RESPONSE, False, problem, label=label)
    return None


def _cleanup(ctx: ScenarioContext) -> None:
    for folder in ctx.session.notes.pop("rad75_folders", []):
        shutil.rmtree(folder, ignore_errors=True)


async def _deliver(ctx: ScenarioContext, items: Sequence[ImageItem], syntaxes: Sequence[str] = DEFAULT_SYNTAXES,
                   ) -> None:
    try:
        result = await retrieve(ctx, items, syntaxes)
        if result is not None:
            ctx.add(delivery_checks(result, items, syntaxes))
    finally:
        _cleanup(ctx)


async def single_series(ctx: ScenarioContext) -> None:
    found = await manifests(ctx)
    series = items_of(found[0], 1)
    await _deliver(ctx, series[0][:_cap(ctx)])


async def multi_series(ctx: ScenarioContext) -> None:
    found = await manifests(ctx)
    best = max(found, key=lambda m: len({r.series_uid for r in m.kos.references}))
    series = items_of(best)
    if len(series) < 2:
        ctx.abort("every study of the test patient has a single series; the test data needs a study with several")
    await _deliver(ctx, spread(series, _cap(ctx)))


async def several_studies(ctx: ScenarioContext) -> None:
    found = await manifests(ctx)
    studies: dict[str, Manifest] = {}
    for m in found:
        studies.setdefault(m.kos.study_instance_uid, m)
    if len(studies) < 2:
        ctx.abort(f"the partner lists {len(studies)} study for the test patient; this scenario needs at least two")
    per_study = [items_of(m, 1)[0] for m in list(studies.values())[:3]]
    await _deliver(ctx, spread(per_study, _cap(ctx)))


async def transfer_syntaxes(ctx: ScenarioContext) -> None:
    found = await manifests(ctx)
    item = items_of(found[0], 1)[0][0]
    delivered_uncompressed = []
    try:
        for label, syntaxes in (("Explicit VR Little Endian only", (EVRLE,)),
                                ("Implicit VR Little Endian only", (IVRLE,)),
                                ("JPIP Referenced only", (rad75.JPIP_REFERENCED,))):
            result = await retrieve(ctx, [item], syntaxes, label=label)
            if result is None:
                continue
            ctx.add(delivery_checks(result, [item], syntaxes, expect_all=False), label=label)
            if syntaxes != (rad75.JPIP_REFERENCED,) and result.documents:
                delivered_uncompressed.append(label)
    finally:
        _cleanup(ctx)
    ctx.check("rad75.uncompressed", "rad75", "the instance is delivered when only an uncompressed Little Endian "
              "syntax is acceptable", spec.RAD75_TRANSFER_SYNTAX, bool(delivered_uncompressed),
              ", ".join(delivered_uncompressed) or "refused for both Explicit and Implicit VR Little Endian")


async def unknown_uids(ctx: ScenarioContext) -> None:
    found = await manifests(ctx)
    real = items_of(found[0], 1)[0][0]
    fake = ImageItem(real.home_community_id, real.repository_unique_id, real.study_uid, real.series_uid,
                     real.sop_class_uid, unknown_uid())
    wrong_repo = ImageItem(real.home_community_id, unknown_uid(), real.study_uid, real.series_uid,
                           real.sop_class_uid, real.sop_instance_uid)
    clause = f"{spec.RAD75_RESPONSE}; {spec.ERROR_CODES}"
    try:
        label = "unknown SOP Instance UID"
        result = await retrieve(ctx, [fake], DEFAULT_SYNTAXES, label=label)
        if result is not None:
            ctx.add(refusal_checks(result, family="rad75", uid=fake.sop_instance_uid,
                                   what="an unknown SOP Instance UID",
                                   codes={RegistryErrorCode.XDSDocumentUniqueIdError}, clause=clause), label=label)
        label = "unknown RepositoryUniqueId"
        result = await retrieve(ctx, [wrong_repo], DEFAULT_SYNTAXES, label=label)
        if result is not None:
            ctx.add(refusal_checks(result, family="rad75", uid=real.sop_instance_uid,
                                   what="an instance asked from an unknown RepositoryUniqueId",
                                   codes={RegistryErrorCode.XDSUnknownRepositoryId,
                                          RegistryErrorCode.XDSDocumentUniqueIdError}, clause=clause), label=label)
    finally:
        _cleanup(ctx)


async def partial_success(ctx: ScenarioContext) -> None:
    found = await manifests(ctx)
    real = items_of(found[0], 1)[0][0]
    fake = ImageItem(real.home_community_id, real.repository_unique_id, real.study_uid, real.series_uid,
                     real.sop_class_uid, unknown_uid())
    try:
        result = await retrieve(ctx, [real, fake], DEFAULT_SYNTAXES)
        if result is None:
            return
        ctx.add(refusal_checks(result, family="rad75", uid=fake.sop_instance_uid, what="the unknown instance",
                               codes={RegistryErrorCode.XDSDocumentUniqueIdError},
                               clause=f"{spec.RAD75_RESPONSE}; {spec.ERROR_CODES}", all_refused=False))
        ctx.add(delivery_checks(result, [real, fake], DEFAULT_SYNTAXES, expect_all=False))
        delivered = any(d.document_unique_id.strip() == real.sop_instance_uid for d in result.documents)
        ctx.check("rad75.partial-delivered", "rad75", "the known instance is still delivered", spec.RAD75_RESPONSE,
                  delivered, "" if delivered else f"{real.sop_instance_uid} was not returned")
    finally:
        _cleanup(ctx)


SCENARIOS = (
    Scenario("rad75-single-series", "RAD-75: the instances of one series", spec.RAD75, PREREQUISITES,
             "Every instance of the first series of a retrieved KOS (at most 40): Success, each a complete DICOM "
             "object with the KOS's UIDs in a requested transfer syntax.", single_series, "RAD-75"),
    Scenario("rad75-multi-series", "RAD-75: one study, several series in one request", spec.RAD75, PREREQUISITES,
             "Instances of every series of the study with the most series, in one request.", multi_series, "RAD-75"),
    Scenario("rad75-several-studies", "RAD-75: several studies in one request", spec.RAD75, PREREQUISITES,
             "The first series of up to three studies in one request (several StudyRequests).", several_studies,
             "RAD-75"),
    Scenario("rad75-transfer-syntax", "RAD-75: the requested transfer syntaxes are honoured",
             spec.RAD75_TRANSFER_SYNTAX, PREREQUISITES,
             "One instance asked for in Explicit VR LE only, Implicit VR LE only and JPIP only: each answer is the "
             "object in that syntax or an error for it, never another syntax.", transfer_syntaxes, "RAD-75"),
    Scenario("rad75-unknown-uid", "RAD-75: unknown UIDs are refused with RegistryErrors",
             f"{spec.RAD75_RESPONSE}; {spec.ERROR_CODES}", PREREQUISITES,
             "An invented SOP Instance UID (XDSDocumentUniqueIdError) and a real one from an invented "
             "RepositoryUniqueId: Failure, an Error naming the document, nothing returned.", unknown_uids, "RAD-75"),
    Scenario("rad75-partial-success", "RAD-75: one known and one unknown instance give PartialSuccess",
             f"{spec.RAD75_RESPONSE}; {spec.STATUS}", PREREQUISITES,
             "A known and an invented instance in one request: PartialSuccess, the known one delivered, an Error for "
             "the other.", partial_success, "RAD-75"),
)
