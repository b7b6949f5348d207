"""ATNA auditing: the DICOM PS3.15 A.5 audit message model (:mod:`~gateway.audit.model`), its XML codec
(:mod:`~gateway.audit.xml`) and the builders of the message of every IHE transaction XIG performs
(:mod:`~gateway.audit.events`)."""
