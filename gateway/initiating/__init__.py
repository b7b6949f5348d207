"""The initiating gateway: partner directory, per-partner client (ITI-55/38/39, RAD-75) and concurrent fan-out."""
