"""Local services for development and CI, without Docker (importable by the tests)."""
