"""XIG benchmarks: each figure is a ratio against a reference run in the same process (``make bench``)."""
