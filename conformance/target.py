"""Who is tested and with which patient: the partner setup of a conformance run.

A partner setup is an ordinary XIG configuration: our identity (``[server]``/``[client]`` certificates,
``[saml]`` assertion attributes) comes from it, the gateway under test is one of its ``[[partners]]``
(endpoints, timeout, signature algorithm, MTOM requests) and ``[conformance]`` names the test patient
the partner has loaded (``family``, ``given``, ``birth_date``, ``gender``).

The XCPD scenarios derive their queries from that patient (see :meth:`TestPatient.demographics`), so
the partner's test data must also hold, for ``xcpd-multiple``, a second patient with the same family
name, birth date and gender whose given name starts with the same letter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.config import Config, PartnerSection
from gateway.errors import XigError
from gateway.ihe.iti55 import PatientDemographics, PersonName
from gateway.initiating.partners import Partner

_DATE = re.compile(r"^\d{8}$")


class SetupError(XigError):
    """The partner setup cannot be used for a run (the message says what to fix)."""


@dataclass(frozen=True)
class TestPatient:
    """The patient the partner under test holds (``[conformance]``)."""

    __test__ = False  # not a pytest test class

    family: str
    given: str
    birth_date: str  #: YYYYMMDD
    gender: str = ""  #: M, F, O, U or empty

    def demographics(self, *, given: str | None = None, birth_date: str | None = None,
                     gender: bool = True, family: str | None = None) -> PatientDemographics:
        """XCPD demographics of this patient, optionally with one trait replaced (``given="C"``: an initial,
        ``birth_date="1931"``: the year only, ``gender=False``: not sent)."""
        name = PersonName(family=(family or self.family,), given=tuple((given or self.given).split()))
        sex = self.gender if gender and self.gender in ("M", "F") else None
        return PatientDemographics(names=(name,), gender=sex, birth_time=birth_date or self.birth_date)

    def describe(self) -> str:
        sex = f", {self.gender}" if self.gender else ""
        return f"{self.family.upper()}^{self.given} born {self.birth_date}{sex}"


@dataclass(frozen=True)
class Target:
    """Everything a run needs to know about the gateway under test."""

    config: Config
    section: PartnerSection
    partner: Partner
    patient: TestPatient


def test_patient(config: Config) -> TestPatient:
    c = config.conformance
    problems = [f"conformance.{key} is not set" for key in ("family", "given", "birth_date")
                if not getattr(c, key).strip()]
    if c.birth_date.strip() and not _DATE.match(c.birth_date.strip()):
        problems.append(f"conformance.birth_date {c.birth_date!r} is not a date YYYYMMDD")
    if problems:
        raise SetupError("the [conformance] section must name the test patient the partner holds: "
                         + "; ".join(problems))
    return TestPatient(c.family.strip(), c.given.strip(), c.birth_date.strip(), c.gender)


def choose_partner(config: Config, name: str | None) -> PartnerSection:
    """The ``[[partners]]`` entry named ``name`` (by name or homeCommunityId), or the only one."""
    if not config.partners:
        raise SetupError("the configuration has no [[partners]] entry: add the gateway under test (name, "
                         "home_community_id and its xcpd_url / xca_query_url / xca_retrieve_url / xcai_retrieve_url)")
    if name is None:
        if len(config.partners) > 1:
            names = ", ".join(repr(p.name) for p in config.partners)
            raise SetupError(f"the configuration has {len(config.partners)} [[partners]] ({names}); choose one "
                             "with --partner NAME")
        return config.partners[0]
    for p in config.partners:
        if p.name == name or p.home_community_id in (name, f"urn:oid:{name}"):
            return p
    names = ", ".join(repr(p.name) for p in config.partners)
    raise SetupError(f"no [[partners]] entry named {name!r} (known: {names})")


def load_target(config: Config, partner_name: str | None = None) -> Target:
    section = choose_partner(config, partner_name)
    return Target(config, section, Partner.from_section(section), test_patient(config))


__all__ = ["SetupError", "Target", "TestPatient", "choose_partner", "load_target", "test_patient"]
