"""Triton backend: grouped MaxSim and the fused Matryoshka InfoNCE loss.

    kernels.py     the @triton.jit kernels (algorithm, numerics and determinism notes)
    heuristics.py  the tile-size / num_warps table keyed by (Rq, Rc, D, dtype)
    launch.py      tensors -> launch plans -> launches
    ops.py         torch.library ops (metaembed::triton_*) + autograd; imported lazily by
                   metaembed_kernels.backends
    verify.py      compile gate: `python -m metaembed_kernels.triton.verify`

Nothing here imports triton until a submodule is imported.
"""
