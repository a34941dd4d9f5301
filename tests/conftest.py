"""Test configuration shared by every module.

Triton's interpreter is chosen here, once, before anything imports triton: without a CUDA
device the Triton kernels run on the CPU under ``TRITON_INTERPRET=1`` (``@triton.jit`` reads
the variable when a kernel is defined), so every module sees the same kernels whichever
files are collected.  An explicit ``TRITON_INTERPRET`` in the environment is kept.

Each pytest-xdist worker computes on one thread (OpenMP, BLAS and torch's intra-op pool), unless
the environment says otherwise: the README's run starts a worker per core, and workers whose
thread pools each span every core contend for them (on the 2-core CI machine one thread a worker
took three test files from 98 s to 64 s).
"""

import importlib.util
import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, "1")

if importlib.util.find_spec("torch") is not None:
    import torch

    if os.environ.get("PYTEST_XDIST_WORKER") and os.environ["OMP_NUM_THREADS"] == "1":
        torch.set_num_threads(1)
    if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "default",
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", parent=settings.get_profile("default"), max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    has_gpu, interpreted = False, False
    if importlib.util.find_spec("torch") is not None:
        import torch

        import hodlr

        has_gpu = torch.cuda.is_available()
        interpreted = hodlr.backends.load("triton").unavailable_reason("torch", torch.device("cpu")) is None
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_compiled = pytest.mark.skip(reason="runs the kernels on CPU tensors: needs Triton's interpreter "
                                            "(TRITON_INTERPRET=1, set here on machines without a CUDA GPU)")
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow")
    for item in items:
        if item.get_closest_marker("gpu") and not has_gpu:
            item.add_marker(skip_gpu)
        if item.get_closest_marker("interpreter") and not interpreted:
            item.add_marker(skip_compiled)
        if item.get_closest_marker("slow") and not config.getoption("--runslow"):
            item.add_marker(skip_slow)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
