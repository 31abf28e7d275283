import pytest


@pytest.fixture(autouse=True, scope="session")
def prefect_harness():
    """Every flow test runs against Prefect's own temporary server and database."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
