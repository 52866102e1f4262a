"""Live migration in direct mode: the disk image itself is locked."""
import legs
import pytest
from legs import *  # noqa: F401,F403  (the checks, collected here)

testinfra_hosts = ["ansible://hv1"]


@pytest.fixture(scope="module")
def lease():
    return legs.DIRECT
