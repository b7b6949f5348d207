"""The simulated community: a real XIG responding gateway over embedded PACS seeded from the fixture.

:func:`simulated_config` derives the gateway's configuration from the user's (identity, TLS, SAML trust,
listen address, responder policy are kept): one filesystem PACS per RepositoryUniqueId of the fixture
and a SQLite database, both under the work directory. :func:`seed` writes the fixture's studies with
:func:`gateway.dicom.synth.make_study` and imports them into those PACS; what it made is the
:class:`Truth` the judge compares requests with (which instance lives in which study, series and
repository, which patients the community knows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from conformance.simulator.fixture import Fixture, FixtureError, PatientSpec
from gateway.config import Config, DatabaseSection, FilesystemPacs, normalize_hcid, normalize_oid
from gateway.dicom.synth import SyntheticStudy, make_study
from gateway.pacs.base import unwrap
from gateway.pacs.filesystem import FilesystemBackend
from gateway.responding.assembly import RespondingServices


@dataclass(frozen=True)
class InstanceTruth:
    study_instance_uid: str
    series_instance_uid: str
    #: bare OID of the PACS holding it: the KOS Retrieve Location UID = RAD-75 RepositoryUniqueId
    repository: str
    patient_id: str


@dataclass(frozen=True)
class SeededStudy:
    patient: PatientSpec
    repository: str
    study: SyntheticStudy
    directory: Path


@dataclass
class Truth:
    """What the simulated community holds and who it is."""

    home_community_id: str  #: urn:oid form
    assigning_authority: str
    #: ITI-39 RepositoryUniqueId of the KOS DocumentEntries
    repository_unique_id: str
    imaging_sources: tuple[str, ...]
    patients: dict[str, PatientSpec] = field(default_factory=dict)
    studies: list[SeededStudy] = field(default_factory=list)
    instances: dict[str, InstanceTruth] = field(default_factory=dict)


def simulated_config(config: Config, fixture: Fixture, work_dir: Path) -> Config:
    """``config`` with one filesystem PACS per repository of ``fixture`` and a database in ``work_dir``."""
    work = work_dir.resolve()
    default = normalize_oid(config.gateway.imaging_source_id)
    pacs = [FilesystemPacs(kind="filesystem", path=work / "pacs" / repo, imaging_source_id=repo,
                           name=f"simulated PACS {repo}")
            for repo in fixture.repositories(default)]
    return config.model_copy(update={
        "pacs": pacs,
        "database": DatabaseSection(url=f"sqlite:///{work / 'simulator.db'}"),
    })


def seed(services: RespondingServices, fixture: Fixture, work_dir: Path) -> Truth:
    """Write the fixture's studies under ``work_dir/seed`` and import each into the PACS of its repository."""
    config = services.config
    default = normalize_oid(config.gateway.imaging_source_id)
    truth = Truth(normalize_hcid(config.gateway.home_community_id), config.gateway.assigning_authority,
                  config.gateway.repository_unique_id, tuple(services.community.source_ids))
    made: dict[str, list[SeededStudy]] = {}
    for patient in fixture.patients:
        truth.patients[patient.id] = patient
        for index, spec in enumerate(patient.studies):
            repo = spec.repository or default
            out = work_dir / "seed" / patient.id / f"study{index + 1}"
            study = make_study(out, patient_id=patient.id, patient_name=patient.dicom_name,
                               birth_date=patient.birth_date, sex=patient.gender, accession=spec.accession,
                               study_date=spec.date, study_description=spec.description,
                               series=tuple((s.modality, s.instances, s.body_part) for s in spec.series),
                               seed=f"{patient.id}/{index}")
            seeded = SeededStudy(patient, repo, study, out)
            truth.studies.append(seeded)
            made.setdefault(repo, []).append(seeded)
            for inst in study.instances:
                truth.instances[inst.SOPInstanceUID] = InstanceTruth(
                    inst.StudyInstanceUID, inst.SeriesInstanceUID, repo, patient.id)
    for repo, studies in made.items():
        backend = services.community.backend_for(repo)
        backend = unwrap(backend) if backend is not None else None
        if not isinstance(backend, FilesystemBackend):
            raise FixtureError("fixture", [f"repository {repo} has no embedded PACS in the simulated community"])
        for s in studies:
            report = backend.index_directory(s.directory)
            if not report.ok:
                raise FixtureError("fixture", [f"{f.source}: {f.reason}" for f in report.failed])
    return truth


__all__ = ["InstanceTruth", "SeededStudy", "Truth", "seed", "simulated_config"]
