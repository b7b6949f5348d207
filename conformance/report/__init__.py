"""Reports of a conformance run: JUnit XML, a self-contained HTML page, the raw exchanges."""
