"""XIG conformance suite: Carequality imaging test-partner scenarios (see the conformance issue)."""
