"""Test layout: ``unit/`` (pure logic), ``contract/`` (one suite, several implementations),
``integration/`` (real services). The service fixtures are plugins under ``fixtures/``.

A service that cannot start FAILS the run with its reason; nothing is skipped.
"""

pytest_plugins = ["tests.fixtures.postgres", "tests.fixtures.kafka", "tests.fixtures.opensearch"]
