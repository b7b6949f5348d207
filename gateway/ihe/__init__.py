"""IHE transaction codecs (ITI-55 XCPD, ITI-38/ITI-39 XCA, RAD-75 XCA-I): XML in, typed dataclasses out, and back."""
