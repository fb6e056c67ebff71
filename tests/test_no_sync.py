"""No host-device synchronisation inside a training step, testable on the CPU.

``NoHostSync`` is a tensor dispatch mode that fails on every operator through which a
tensor's value reaches the host (``.item()``, ``bool(t)``, ``int(t)``, ``torch.equal``,
``.tolist()`` ...). Our C++ and Python-defined ops are re-dispatched with the mode still
active, so the ATen calls made *inside* a kernel's host code are checked as well. On a GPU,
tests/test_cuda.py adds ``torch.cuda.set_sync_debug_mode("error")`` and a CUDA-graph capture.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import op_backends
from metaembed_kernels import (
    DEFAULT_GROUPS,
    MatryoshkaInfoNCELoss,
    matryoshka_infonce,
    maxsim_grouped,
    maxsim_paired_grouped,
)

SYNCING_OPS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::item", "aten::nonzero",
               "aten::masked_select", "aten::unique", "aten::_unique2", "aten::repeat_interleave"}


class NoHostSync(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.seen.add(name)
        if name in SYNCING_OPS:
            raise AssertionError(f"host-device sync inside a training step: {name}")
        kwargs = kwargs or {}
        if func.namespace == "metaembed":
            # Run the op's kernel with this mode still active, so that what its host code
            # calls is checked too.
            key = torch._C.DispatchKey.CPU
            if not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"):
                key = torch._C.DispatchKey.CompositeExplicitAutograd
            with self:
                return func._op_dk(key, *args, **kwargs)
        return func(*args, **kwargs)


def test_the_mode_catches_a_sync():
    with pytest.raises(AssertionError, match="_local_scalar_dense"):
        with NoHostSync():
            torch.ones(2).sum().item()
    with pytest.raises(AssertionError, match="host-device sync"):
        with NoHostSync():
            bool(torch.ones(2).all())


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(6, 16, 24, generator=g, requires_grad=True)
    c = torch.randn(7, 64, 24, generator=g, requires_grad=True)
    hn = torch.randn(6, 2, 64, 24, generator=g, requires_grad=True)
    cp = torch.randn(6, 3, 64, 24, generator=g, requires_grad=True)
    qm = torch.rand(6, 16, generator=g) > 0.2
    cm = torch.rand(7, 64, generator=g) > 0.2
    return q, c, hn, cp, qm, cm


@pytest.mark.parametrize("backend", op_backends())
def test_forward_and_backward_of_every_op_never_sync(backend):
    q, c, hn, cp, qm, cm = _inputs()
    labels = torch.tensor([6, 0, 1, 2, 3, 4])
    mode = NoHostSync()
    with mode:
        scores = maxsim_grouped(q, c, DEFAULT_GROUPS, q_mask=qm, c_mask=cm, backend=backend)
        paired = maxsim_paired_grouped(q, cp, DEFAULT_GROUPS, q_mask=qm, backend=backend)
        loss = matryoshka_infonce(q, c, DEFAULT_GROUPS, hard_negatives=hn, q_mask=qm, c_mask=cm, labels=labels,
                                  backend=backend)
        (loss + scores.mean() + paired.mean()).backward()
        MatryoshkaInfoNCELoss(backend=backend)(q, c, hn).backward()
    assert any(n.startswith("metaembed::") for n in mode.seen)  # the ops did run under the mode


def test_model_wrapper_forward_and_loss_never_sync():
    """The wrapper's own code (meta-token insertion, padding handling, loss) does not sync;
    the backbone's internals are transformers' business and run outside the mode."""
    transformers = pytest.importorskip("transformers")
    from metaembed_kernels import MetaEmbed

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    backbone = transformers.BertModel(config)
    backbone_forward = backbone.forward

    def forward_outside_the_mode(*args, **kwargs):
        with torch.utils._python_dispatch._disable_current_modes():
            return backbone_forward(*args, **kwargs)

    backbone.forward = forward_outside_the_mode
    model = MetaEmbed(backbone, 4, 8, groups=((1, 1), (4, 8)))
    ids = torch.randint(5, 50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    mode = NoHostSync()
    with mode:
        out = model(batch, batch)
        out.loss.backward()
    assert "metaembed::matryoshka_infonce" in mode.seen
    assert model.meta_tokens.grad is not None
