"""One schema table for every backend: the C++ declarations (csrc/common/schemas.h, registered
by the extension) equal metaembed_kernels/_schemas.py, from which the Python-defined backends
(reference, triton) register; and every backend registers every op of the table."""
import pytest
import torch

from helpers import op_backends, requires_extension
from metaembed_kernels._schemas import OP_NAMES, SCHEMAS
from metaembed_kernels.backends import get_backend


def _schema(namespace: str, name: str) -> str:
    """The registered schema without its name, e.g. '(Tensor q, ...) -> Tensor'."""
    text = str(getattr(getattr(torch.ops, namespace), name).default._schema)
    return text[text.index("("):]


def _normalised(schema: str) -> str:
    return str(torch._C.parse_schema("op" + schema))[2:]


@requires_extension
@pytest.mark.parametrize("name", OP_NAMES)
def test_cpp_schemas_equal_the_python_table(name):
    assert _schema("metaembed", name) == _normalised(SCHEMAS[name])


@pytest.mark.parametrize("backend", op_backends())
@pytest.mark.parametrize("name", OP_NAMES)
def test_every_backend_registers_every_op_of_the_table(backend, name):
    b = get_backend(backend)
    assert _schema(b.op_namespace, b.op_prefix + name) == _normalised(SCHEMAS[name])


def test_the_table_covers_three_op_families_with_backward_ops():
    forward = [n for n in OP_NAMES if not n.endswith("_backward")]
    assert sorted(forward) == ["matryoshka_infonce", "maxsim_grouped", "maxsim_paired_grouped"]
    for n in forward:
        assert n + "_backward" in SCHEMAS and "output_mask" in SCHEMAS[n + "_backward"]
