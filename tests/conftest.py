import os
import sys

import pytest
import torch

# Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors. The switch
# must be set before triton is first imported (torch does not import it eagerly).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # `import helpers`

from metaembed_kernels import _extension  # noqa: E402


def pytest_configure(config):
    """Under pytest-xdist (make test: -n auto), each worker takes its share of torch's threads:
    two workers on two cores each running two OpenMP threads oversubscribe them (measured: the
    suite 405 s that way, 360 s with one thread per worker). Tests of thread counts set their
    own (the num_threads fixture)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, torch.get_num_threads() // workers))


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)


@pytest.fixture(params=_extension.supported_cpu_isas() or ["none"])
def cpu_isa(request):
    """Run a test once per instruction set the CPU kernels can use on this machine."""
    if request.param == "none":
        pytest.skip("C++ extension not built")
    previous = _extension.set_cpu_isa(request.param)
    yield request.param
    _extension.set_cpu_isa(previous)


@pytest.fixture
def num_threads():
    """Restores torch's thread count after a test changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def pytest_runtest_logreport(report):
    """METAEMBED_REPORT_FAILURES_AT_ONCE=1: print each failure as it happens, so a run that
    a crash or a time limit cuts short still shows why what failed before it failed (the
    GPU check sets it)."""
    if report.failed and os.environ.get("METAEMBED_REPORT_FAILURES_AT_ONCE") == "1":
        text = report.longreprtext
        sys.__stderr__.write(f"\n--- FAILED {report.nodeid} ({report.when}) ---\n{text[-4000:]}\n")
        sys.__stderr__.flush()
