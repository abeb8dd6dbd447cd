"""Shared fixtures live in tests/fixtures/; each module there owns one real component."""

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.pg",
    "tests.fixtures.docker",
    "tests.fixtures.browser",
    "tests.fixtures.mongo",
]
