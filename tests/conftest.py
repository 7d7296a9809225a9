import os

import pytest

# Keep Ray's own chatter and memory use small in tests.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_session():
    """One in-process Ray for the whole test session (2 real cores, fractional workers)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def require(module: str):
    """importorskip, except under CI=true, where a missing dependency is a failure."""
    if os.environ.get("CI") == "true":
        return __import__(module)
    return pytest.importorskip(module)
