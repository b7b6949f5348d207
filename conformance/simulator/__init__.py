"""The responder role of the conformance suite: ``xig conformance simulate``.

A simulated responding community (XIG's own responding gateway over embedded PACS seeded from a
fixture file) that records and judges every request an initiating gateway sends it, and injects
faults to see how that gateway copes. See :mod:`conformance.simulator.simulator`.
"""

from conformance.simulator.faults import FaultSpec, parse_fault
from conformance.simulator.fixture import Fixture, FixtureError, load_fixture, parse_fixture
from conformance.simulator.simulator import Simulator

__all__ = ["FaultSpec", "Fixture", "FixtureError", "Simulator", "load_fixture", "parse_fault", "parse_fixture"]
