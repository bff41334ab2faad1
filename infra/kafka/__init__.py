"""infra/kafka as a package, so tests import its service module directly."""
