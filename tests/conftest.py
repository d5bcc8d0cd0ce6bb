"""Suite-wide setup: Triton kernels run in the CPU interpreter; every test gets fresh randomness."""

import os

# Must be set before triton.jit decorates any kernel: the test suite exercises every Triton kernel
# on CPU tensors through the interpreter. (The lowering tests compile real GPU code in a separate
# process without this variable.)
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def seed(request) -> int:
    """A fresh random seed per test (printed on failure), applied to torch's global generator."""
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    return value


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None:
        for key, value in item.user_properties:
            if key == "seed":
                print(f"\n[{item.nodeid}] random seed: {value}")
