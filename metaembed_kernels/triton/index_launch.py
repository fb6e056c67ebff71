"""Launcher of the index scoring kernel (index_kernels.py): a block of a segment's rows against
the queries -> (G, Nq, block) scores, read straight from the prefix slabs.

Planning is separate from running (as in launch.py) so that the compile gate (verify.py)
compiles exactly the launches this module makes. Offsets between slabs are element counts
relative to slab 0's pointer (one flat address space: CUDA's, or the host's under
TRITON_INTERPRET=1); the tables are small int64 tensors on the device.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch

from . import heuristics as H
from . import index_kernels as K
from .launch import LaunchPlan, _cdiv, _mask_view, interpret_mode


def supports(groups) -> bool:
    """Budgets within one token tile (r_q <= 64, r_c <= 128); larger ones take the chunked
    MaxSim kernel through the generic blockwise loop."""
    rq_eff, rc_eff = max(g[0] for g in groups), max(g[1] for g in groups)
    return not H.maxsim_forward_config(1, rq_eff, rc_eff, 128, torch.bfloat16).chunked


def _element_offset(t: torch.Tensor, base: torch.Tensor) -> int:
    delta = t.data_ptr() - base.data_ptr()
    if delta % t.element_size():
        raise RuntimeError("index slabs are not element-aligned with each other")
    return delta // t.element_size()


def _tables(data: Sequence[torch.Tensor], masks, scales, bounds: Sequence[int], rc_eff: int, rc_tile: int,
            device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    D = data[0].shape[2]
    base, stride, local = [], [], []
    slots = [0] * (4 * rc_tile)  # [rc_tile][mask base, mask stride] + [rc_tile][scale base, stride]
    s = 0
    for j in range(rc_eff):
        while bounds[s + 1] <= j:
            s += 1
        w, v = bounds[s + 1] - bounds[s], j - bounds[s]
        base.append(_element_offset(data[s], data[0]))
        stride.append(w * D)
        local.append(v * D)
        if masks is not None:
            slots[2 * j] = _element_offset(masks[s], masks[0]) + v
            slots[2 * j + 1] = w
        if scales is not None:
            slots[2 * rc_tile + 2 * j] = _element_offset(scales[s], scales[0]) + 2 * v
            slots[2 * rc_tile + 2 * j + 1] = 2 * w
    as_tensor = lambda x: torch.tensor(x, dtype=torch.int64, device=device)  # noqa: E731
    return as_tensor(base), as_tensor(stride), as_tensor(local), as_tensor(slots)


def plan_index_scores(q: torch.Tensor, q_mask: Optional[torch.Tensor], data: List[torch.Tensor],
                      masks: Optional[List[torch.Tensor]], scales: Optional[List[torch.Tensor]],
                      bounds: Sequence[int], groups, n_rows: int, r_begin: int, n_out: int,
                      interpret: Optional[bool] = None):
    """-> (out (G, Nq, n_out) float32, [LaunchPlan]). data[s] (cap, w_s, D) slabs of one segment
    (float32 / bfloat16 / int8), masks[s] (cap, w_s) bool, scales[s] (cap, w_s, 2) float32."""
    nq, rq, D = q.shape
    rq_eff, rc_eff = max(g[0] for g in groups), max(g[1] for g in groups)
    int8 = data[0].dtype == torch.int8
    tile_dtype = torch.bfloat16 if int8 else q.dtype
    # The MaxSim forward's tile table, made smaller: the index tile also carries the column
    # tables, candidate validity and (int8) three query pieces and a scale per column. Query
    # rows are capped at 32 (float32 / int8) or 64 (bfloat16), D chunks at 32 (16 for float32
    # beside 64 rows), 8 warps from
    # 32 x 128, and at most 64 candidate columns beside 64 query rows: every configuration
    # compiles without spills on sm_80 and sm_90 (verify.py).
    rq_tile = H.next_power_of_two(rq_eff)
    row_cap = 32 if (int8 or q.dtype == torch.float32) else 64
    nq_cfg = max(1, min(nq, row_cap // rq_tile))
    cfg = H.maxsim_forward_config(nq_cfg, rq_eff, rc_eff, D, tile_dtype)
    cfg = dataclasses.replace(cfg, block_d=min(cfg.block_d, 32),
                              num_warps=8 if cfg.m * cfg.n >= 32 * 128 else cfg.num_warps)
    if cfg.m >= 64 and cfg.n > 64:
        cfg = dataclasses.replace(cfg, block_c=max(1, 64 // cfg.rc_tile))
    if cfg.m >= 64 and q.dtype == torch.float32 and not int8:  # FMA dots: D chunks of 16
        cfg = dataclasses.replace(cfg, block_d=16)
    if cfg.num_warps == 8:  # ptxas 12.8 (triton 3.6) capped these at 128 registers and spilled
        cfg = dataclasses.replace(cfg, max_registers=H.WIDE_FORWARD_REGISTERS)
        if q.dtype == torch.float32 and not int8:  # FMA dots: their operand chunks live in registers
            cfg = dataclasses.replace(cfg, block_d=16)
    if cfg.chunked:
        raise ValueError(f"budget ({rq_eff}, {rc_eff}) spans several token tiles: use the chunked MaxSim path")
    device = q.device
    tok_base, tok_stride, tok_local, slots = _tables(data, masks, scales, bounds, rc_eff, cfg.rc_tile, device)
    out = torch.empty((len(groups), nq, n_out), dtype=torch.float32, device=device)
    qm = _mask_view(q_mask, q.shape[:2], device)
    mask0 = masks[0].view(torch.uint8) if masks is not None else qm  # unused when HAS_MASK is False
    scale0 = scales[0] if scales is not None else out  # unused unless INT8
    num_q_blocks = _cdiv(nq, cfg.block_q)
    args = dict(
        q_ptr=q, q_mask_ptr=qm, data_ptr=data[0], mask_ptr=mask0, scale_ptr=scale0, tok_base_ptr=tok_base,
        tok_stride_ptr=tok_stride, tok_local_ptr=tok_local, slot_table_ptr=slots,
        group_rq_ptr=torch.tensor([g[0] for g in groups], dtype=torch.int32, device=device),
        group_rc_ptr=torch.tensor([g[1] for g in groups], dtype=torch.int32, device=device),
        out_ptr=out, n_q=nq, n_rows=n_rows, r_begin=r_begin, n_out=n_out, rq_eff=rq_eff, rc_eff=rc_eff, D=D,
        n_groups=len(groups), num_q_blocks=num_q_blocks, stride_qa=q.stride(0), stride_qi=q.stride(1),
        stride_mqa=qm.stride(0), stride_mqi=qm.stride(1),
    )
    constexprs = dict(BLOCK_Q=cfg.block_q, RQ_TILE=cfg.rq_tile, BLOCK_C=cfg.block_c, RC_TILE=cfg.rc_tile,
                      BLOCK_D=cfg.block_d, HAS_MASK=masks is not None, INT8=int8,
                      DOT_PRECISION=H.numerics(q.dtype)["DOT_PRECISION"],
                      INTERPRET=interpret_mode() if interpret is None else interpret)
    grid = (num_q_blocks * _cdiv(n_out, cfg.block_c),)
    return out, [LaunchPlan("index scores" + (" int8" if int8 else ""), K.index_scores_kernel, grid, args,
                            constexprs, cfg)]


def score_block(store, seg, q: torch.Tensor, q_mask: Optional[torch.Tensor], groups, r0: int, r1: int) -> torch.Tensor:
    """(G, Nq, r1 - r0) scores of rows [r0, r1) of a segment (index/search.py's blockwise loop)."""
    rc_eff = max(g[1] for g in groups)
    count = next(s for s in range(len(store.bounds) - 1) if store.bounds[s + 1] >= rc_eff) + 1
    q = q.contiguous()
    out, plans = plan_index_scores(q, q_mask, seg.data[:count], None if seg.masks is None else seg.masks[:count],
                                   None if seg.scales is None else seg.scales[:count], store.bounds, groups,
                                   seg.n, r0, r1 - r0)
    for plan in plans:
        plan.run()
    return out


def gate_plans(dtype: torch.dtype, rq: int, rc: int, d: int):
    """(workload label, LaunchPlan) of every index launch at this shape, from meta tensors, for
    the compile gate (verify.py): float32 -> float32 and int8 indexes, bfloat16 -> bfloat16;
    every distinct tile that some Nq picks, with and without candidate masks."""
    from ..index.storage import slab_bounds

    if dtype == torch.float16:
        return []
    groups = tuple(dict.fromkeys([g for g in ((1, 1), (2, 4), (4, 8), (8, 16), (16, 64)) if g[0] <= rq and g[1] <= rc]
                                 + [(rq, rc)]))
    if not supports(groups):
        return []
    bounds = slab_bounds(rc)
    widths = [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:])]
    stored = [torch.float32, torch.int8] if dtype == torch.float32 else [dtype]
    out = []
    for cdtype in stored:
        data = [torch.empty(100_000, w, d, dtype=cdtype, device="meta") for w in widths]
        scales = [torch.empty(100_000, w, 2, dtype=torch.float32, device="meta") for w in widths] \
            if cdtype == torch.int8 else None
        for masked in (False, True):
            masks = [torch.empty(100_000, w, dtype=torch.bool, device="meta") for w in widths] if masked else None
            seen = set()
            for nq in range(1, 1100):  # one launch per distinct tile any Nq picks
                q = torch.empty(nq, rq, d, dtype=dtype, device="meta")
                _, plans = plan_index_scores(q, None, data, masks, scales, bounds, groups, 100_000, 0, 65_536,
                                             interpret=False)
                if plans[0].config in seen:
                    continue
                seen.add(plans[0].config)
                label = f"Nq={nq}{',int8' if cdtype == torch.int8 else ''}{',mask' if masked else ''}"
                out += [(label, p) for p in plans]
    return out
