"""The fixture file of a simulated community: its patients, their studies and the faults to inject.

TOML or JSON (by file extension; ``.json`` is JSON, anything else TOML), one schema::

    [[patients]]
    id = "SIM-1001"              # PatientID in the community's assigning authority ([gateway])
    family = "DOE"
    given = "Dana"
    birth_date = "19700405"      # YYYYMMDD
    gender = "F"                 # M, F, O or U

    [[patients.studies]]
    description = "CT chest"
    date = "20240110"            # YYYYMMDD
    accession = "SIM-A1"
    repository = "2.999.7.3"     # optional: RAD-75 RepositoryUniqueId of the PACS holding it
    series = [{ modality = "CT", instances = 3, body_part = "CHEST" }]

    [[faults]]                   # see conformance.simulator.faults for every kind
    transaction = "ITI-38"
    kind = "delay"
    delay_ms = 1500

Studies without ``repository`` live in the PACS of the configuration's ``[gateway] imaging_source_id``;
each distinct ``repository`` becomes a PACS of its own (so the RAD-75 grouping by repository is
exercised). Every problem in the file is reported at once as a :class:`FixtureError`.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from conformance.simulator.faults import FaultSpec, make_fault
from gateway.config import ConfigError, normalize_oid

_DATE = re.compile(r"^\d{8}$")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class FixtureError(ConfigError):
    """The fixture file cannot be used; ``problems`` lists every reason."""


@dataclass(frozen=True)
class SeriesSpec:
    modality: str
    instances: int
    body_part: str = ""


@dataclass(frozen=True)
class StudySpec:
    description: str
    date: str
    accession: str
    series: tuple[SeriesSpec, ...]
    #: RAD-75 RepositoryUniqueId (bare OID) of the PACS holding the study; None = the gateway's imaging_source_id
    repository: str | None = None


@dataclass(frozen=True)
class PatientSpec:
    id: str
    family: str
    given: str
    birth_date: str
    gender: str
    studies: tuple[StudySpec, ...] = ()

    @property
    def dicom_name(self) -> str:
        return f"{self.family}^{self.given}"


@dataclass(frozen=True)
class Fixture:
    patients: tuple[PatientSpec, ...]
    faults: tuple[FaultSpec, ...] = ()

    @property
    def instance_count(self) -> int:
        return sum(se.instances for p in self.patients for st in p.studies for se in st.series)

    def repositories(self, default: str) -> list[str]:
        """Every RepositoryUniqueId the fixture uses (``default`` for studies naming none), in order."""
        return list(dict.fromkeys(st.repository or default for p in self.patients for st in p.studies)) or [default]


# --------------------------------------------------------------------------------------------------
# Validation models
# --------------------------------------------------------------------------------------------------

class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _date(v: str) -> str:
    if not _DATE.match(v):
        raise ValueError(f"{v!r} is not a date YYYYMMDD")
    return v


class _Series(_Model):
    modality: str = "CT"
    instances: int = Field(default=3, ge=1, le=10_000)
    body_part: str = ""

    @field_validator("modality")
    @classmethod
    def _modality(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z]{2,16}$", v):
            raise ValueError(f"{v!r} is not a DICOM modality (e.g. CT, MR, US)")
        return v.upper()


class _Study(_Model):
    description: str = ""
    date: str = "20240115"
    accession: str = ""
    repository: str | None = None
    series: list[_Series] = Field(default_factory=lambda: [_Series()], min_length=1)

    @field_validator("date")
    @classmethod
    def _study_date(cls, v: str) -> str:
        return _date(v)

    @field_validator("repository")
    @classmethod
    def _repository(cls, v: str | None) -> str | None:
        return None if v is None else normalize_oid(v)


class _Patient(_Model):
    id: str
    family: str = Field(min_length=1)
    given: str = ""
    birth_date: str
    gender: Literal["M", "F", "O", "U"]
    studies: list[_Study] = Field(default_factory=list)

    @field_validator("birth_date")
    @classmethod
    def _birth_date(cls, v: str) -> str:
        return _date(v)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not _ID.match(v):
            raise ValueError(f"{v!r} is not a usable patient id (letters, digits, '.', '_', '-'; at most 64)")
        return v


class _Fixture(_Model):
    patients: list[_Patient] = Field(min_length=1)
    faults: list[dict[str, Any]] = Field(default_factory=list)


def _loc(err: Any) -> str:
    out = ""
    for part in err["loc"]:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(file)"


def _faults(raw: Any) -> tuple[list[FaultSpec], list[str]]:
    if raw is None:
        return [], []
    if not isinstance(raw, list):
        return [], ["faults: expected a list of tables ([[faults]])"]
    faults: list[FaultSpec] = []
    problems: list[str] = []
    for i, item in enumerate(raw):
        try:
            if not isinstance(item, dict):
                raise ValueError("expected a table with transaction, kind and the kind's settings")
            faults.append(make_fault(**item))
        except TypeError as exc:  # an unknown setting
            problems.append(f"faults[{i}]: {str(exc).split('() ', 1)[-1]}")
        except ValueError as exc:
            problems.append(f"faults[{i}]: {exc}")
    return faults, problems


def parse_fixture(data: dict[str, Any], *, source: str = "<fixture>") -> Fixture:
    """Validate fixture data (a parsed TOML/JSON document); :class:`FixtureError` lists every problem."""
    faults, problems = _faults(data.get("faults"))
    try:
        model = _Fixture.model_validate({**data, "faults": []})
    except ValidationError as exc:
        found = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling)"
            found.append(f"{_loc(err)}: {msg}")
        raise FixtureError(source, found + problems) from None
    seen: set[str] = set()
    for i, p in enumerate(model.patients):
        if p.id in seen:
            problems.append(f"patients[{i}].id: {p.id!r} is used twice")
        seen.add(p.id)
    if problems:
        raise FixtureError(source, problems)
    patients = tuple(
        PatientSpec(p.id, p.family, p.given, p.birth_date, p.gender, tuple(
            StudySpec(s.description, s.date, s.accession,
                      tuple(SeriesSpec(se.modality, se.instances, se.body_part) for se in s.series), s.repository)
            for s in p.studies))
        for p in model.patients)
    return Fixture(patients, tuple(faults))


def load_fixture(path: Path | str) -> Fixture:
    """Read a fixture file (``.json`` → JSON, otherwise TOML)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FixtureError(str(p), ["file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FixtureError(str(p), [f"cannot be read: {exc}"]) from None
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        kind = "JSON" if p.suffix.lower() == ".json" else "TOML"
        raise FixtureError(str(p), [f"not valid {kind}: {exc}"]) from None
    if not isinstance(data, dict):
        raise FixtureError(str(p), ["the document must be an object/table with a 'patients' list"])
    return parse_fixture(data, source=str(p))


__all__ = ["Fixture", "FixtureError", "PatientSpec", "SeriesSpec", "StudySpec", "load_fixture", "parse_fixture"]
