"""torch.compile(fullgraph=True) on the first call of a fresh process, for every backend that
runs here, compiled before any eager call (nothing cached by an earlier eager call can hide
a graph break), forward and backward; and dynamic=True across batch sizes without a recompile."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from helpers import op_backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIRST_CALL = textwrap.dedent(
    """
    import json, sys, torch
    import metaembed_kernels as mk
    backend = sys.argv[1]
    dtype = torch.float32
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 6, 20, generator=g, dtype=dtype, requires_grad=True)
    c = torch.randn(5, 9, 20, generator=g, dtype=dtype, requires_grad=True)
    hn = torch.randn(4, 2, 9, 20, generator=g, dtype=dtype, requires_grad=True)
    cp = torch.randn(4, 3, 9, 20, generator=g, dtype=dtype, requires_grad=True)
    groups = ((1, 1), (2, 4), (6, 9))

    def step(q, c, hn, cp):
        loss = mk.matryoshka_infonce(q, c, groups, hard_negatives=hn, temperature=0.1, backend=backend)
        loss = loss + 1e-2 * mk.maxsim_grouped(q, c, groups, backend=backend).square().mean()
        loss = loss + 1e-2 * mk.maxsim(q, c, backend=backend).mean()
        return loss + 1e-2 * mk.maxsim_paired_grouped(q, cp, groups, backend=backend).mean()

    torch._dynamo.config.error_on_recompile = True
    compiled = torch.compile(step, fullgraph=True)  # inductor, before any eager call
    out = compiled(q, c, hn, cp)
    grads = torch.autograd.grad(out, (q, c, hn, cp))
    eager = step(q, c, hn, cp)
    eager_grads = torch.autograd.grad(eager, (q, c, hn, cp))
    torch.testing.assert_close(out, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)
    print(json.dumps({"loss": out.item()}))
    """
)

DYNAMIC = textwrap.dedent(
    """
    import json, sys, torch
    import metaembed_kernels as mk
    from torch._dynamo.utils import counters
    backend = sys.argv[1]
    groups = ((1, 1), (2, 4), (6, 9))

    def step(q, c):
        return mk.matryoshka_infonce(q, c, groups, temperature=0.1, backend=backend) \\
            + mk.maxsim_grouped(q, c, groups, backend=backend).mean()

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    results = []
    for n in (4, 7):
        g = torch.Generator().manual_seed(n)
        q = torch.randn(n, 6, 20, generator=g, requires_grad=True)
        c = torch.randn(n + 3, 9, 20, generator=g, requires_grad=True)  # sizes distinct from Rq, Rc, D
        out = compiled(q, c)
        out.backward()
        torch.testing.assert_close(out, step(q.detach(), c.detach()))
        results.append(out.item())
    print(json.dumps({"frames": counters["stats"]["unique_graphs"], "results": results}))
    """
)


def _run(script: str, backend: str) -> dict:
    env = dict(os.environ)
    res = subprocess.run([sys.executable, "-c", script, backend], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=900)
    assert res.returncode == 0, f"{backend}: exit {res.returncode}\n{res.stdout}\n{res.stderr[-6000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", op_backends())
def test_fullgraph_compile_on_the_first_call_of_a_fresh_process(backend):
    _run(FIRST_CALL, backend)


@pytest.mark.parametrize("backend", op_backends())
def test_dynamic_shapes_compile_once_for_two_batch_sizes(backend):
    out = _run(DYNAMIC, backend)
    assert out["frames"] == 1, out
