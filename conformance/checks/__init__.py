"""The checks: pure functions from a partner's answer to :class:`~conformance.model.Check` results."""

#: every check family the initiator-role checks produce (each has a negative test: a responder broken so
#: that a check of that family fails)
FAMILIES = frozenset({"soap", "xsd", "xcpd", "iti38", "metadata", "iti39", "kos", "rad75", "registry", "security"})
