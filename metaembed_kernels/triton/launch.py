"""Launchers: turn tensors into kernel launches (a list of LaunchPlan), then run them.

Planning is separate from running so that the compile gate (verify.py) builds exactly the
launches the ops would make -- same kernels, same constexprs, same runtime-argument
specialisation -- from meta tensors, and compiles them for real GPU targets.

Every kernel reads the last dimension with stride 1, so inputs are made contiguous; masks
are passed as uint8 views, and an absent mask is a stride-0 view of a single True (no
allocation, one cached byte). Offsets are computed in int64 inside the kernels.

Budgets beyond one token tile run the kernels' chunked branch (CHUNKED), which handles at
most heuristics.CHUNK_GROUPS groups per launch: more groups become several launches, each
given a slice of the group lists and of the per-group outputs / gradients (views, no copies).
Launches that add into the same dq / dc run one after another on the stream (deterministic).

Arguments are checked by the validator every backend shares (_validation.check_*_op: the same
checks and messages as the reference, cpu and cuda ops); only what triton alone refuses
(float64, budgets past its int32 token indices) is checked here. Backward plans allocate and
launch only for the gradients output_mask asks for.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .. import _validation as V
from . import heuristics as H
from . import kernels as K


GRADIENT_NUMERICS = ("PIECE_DTYPE", "SPLIT_FP32_OPERANDS", "SCALE_TO_FP16_RANGE")


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclasses.dataclass
class LaunchPlan:
    role: str  # what the launch computes, for reports
    kernel: Any  # triton JITFunction
    grid: Tuple[int, ...]
    args: Dict[str, Any]  # runtime arguments by name
    constexprs: Dict[str, Any]
    config: H.TileConfig

    def run(self) -> None:
        if self.grid[0] > 0:
            self.kernel[self.grid](**self.args, **self.constexprs, **self.config.options())


def own_candidate_config(p: Problem, backward: bool) -> H.TileConfig:
    """heuristics.hard_negative_config (one query against a block of its own candidates), with
    what the compile gate needed for fp32 single-tile tiles, whose kernels loop over a query's
    candidate blocks: the forward's FMA dot takes 16-wide D chunks (its operand chunks live
    in registers; 32 spilled on sm_80, as heuristics found for chunked fp32 forward tiles), and
    the backward passes may use every register (ptxas capped the paired dc pass at 128 and
    spilled; it needs ~210), like heuristics' fp32 gradient passes. (Tile policy: it could
    live in heuristics.hard_negative_config.)"""
    cfg = H.hard_negative_config(p.rq_eff, p.rc_eff, p.d, p.q.dtype, backward=backward)
    if p.q.dtype != torch.float32 or cfg.chunked:
        return cfg
    if backward:
        return dataclasses.replace(cfg, max_registers=H.FP32_GRADIENT_REGISTERS)
    return dataclasses.replace(cfg, block_d=H.MIN_DOT)


def grad_query_config(cfg: H.TileConfig) -> H.TileConfig:
    """The dq pass's tile (in-batch and per-query-candidate): the backward tile, whose fp32
    maxnreg 255 the dc / dx pass needs (triton 3.6 capped it at 128 and spilled), with a
    single-tile dq pass left to ptxas's own register target: at 255 it spilled (sm_90 fp32,
    32 x 128: 255 + 16 B; per-query candidates with triton 3.6: 8 B), unconstrained it fits."""
    return cfg if cfg.chunked else dataclasses.replace(cfg, max_registers=0)


def _mask_view(mask: Optional[torch.Tensor], shape: Sequence[int], device) -> torch.Tensor:
    """uint8 view of a bool mask; None -> all-true, as a stride-0 view (no allocation)."""
    if mask is None:
        return torch.ones((1,) * len(shape), dtype=torch.uint8, device=device).expand(*shape)
    return mask.contiguous().view(torch.uint8)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass
class Problem:
    """Checked, contiguous inputs and the derived sizes shared by every launch. In a paired
    problem c is (B, N, Rc, D) and c_mask (B, N, Rc): see paired_candidates."""
    q: torch.Tensor
    c: torch.Tensor
    q_mask: torch.Tensor  # uint8 (Nq, Rq), maybe stride 0
    c_mask: torch.Tensor  # uint8 (Nc, Rc), maybe stride 0
    group_rq: torch.Tensor  # int32 (G,) on the device
    group_rc: torch.Tensor
    rq_eff: int
    rc_eff: int
    interpret: bool

    @property
    def nq(self) -> int:
        return self.q.shape[0]

    @property
    def nc(self) -> int:
        return self.c.shape[0]

    @property
    def d(self) -> int:
        return self.q.shape[2]

    @property
    def num_groups(self) -> int:
        return self.group_rq.shape[0]

    def common_args(self) -> Dict[str, Any]:
        q, c, qm, cm = self.q, self.c, self.q_mask, self.c_mask
        return dict(
            q_ptr=q, c_ptr=c, q_mask_ptr=qm, c_mask_ptr=cm, group_rq_ptr=self.group_rq, group_rc_ptr=self.group_rc,
            n_q=self.nq, n_c=self.nc, rq_eff=self.rq_eff, rc_eff=self.rc_eff, D=self.d, n_groups=self.num_groups,
            stride_qa=q.stride(0), stride_qi=q.stride(1), stride_cb=c.stride(0), stride_cj=c.stride(1),
            stride_mqa=qm.stride(0), stride_mqi=qm.stride(1), stride_mcb=cm.stride(0), stride_mcj=cm.stride(1),
        )

    def tile_constexprs(self, cfg: H.TileConfig, with_gradient_chunk: bool = False) -> Dict[str, Any]:
        out = dict(BLOCK_Q=cfg.block_q, RQ_TILE=cfg.rq_tile, BLOCK_C=cfg.block_c, RC_TILE=cfg.rc_tile,
                   BLOCK_D=cfg.block_d, INTERPRET=self.interpret, CHUNKED=cfg.chunked)
        numerics = H.numerics(self.q.dtype)
        out["DOT_PRECISION"] = numerics["DOT_PRECISION"]
        if with_gradient_chunk:
            out.update(BLOCK_DO=cfg.block_do, Q_CHUNKED=cfg.q_chunked, **{k: numerics[k] for k in GRADIENT_NUMERICS})
        return out

    def group_batches(self, cfg: H.TileConfig, carries_state: bool = False) -> List[Tuple[int, int]]:
        """[g0, g1) ranges of the groups, one per launch."""
        size = H.groups_per_launch(self.num_groups, cfg.chunked, carries_state)
        return [(g0, min(self.num_groups, g0 + size)) for g0 in range(0, self.num_groups, size)]

    def group_args(self, g0: int, g1: int) -> Dict[str, Any]:
        return dict(group_rq_ptr=self.group_rq[g0:g1], group_rc_ptr=self.group_rc[g0:g1], n_groups=g1 - g0)


def _check_triton_support(dtype: torch.dtype, group_rq: Sequence[int], group_rc: Sequence[int]) -> None:
    """What only this backend refuses (the shared validator has checked everything else)."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"q must be float32, float16 or bfloat16 on the triton backend, got {dtype}")
    reason = H.unsupported_reason(max(group_rq), max(group_rc))
    if reason is not None:  # only absurd budgets (>= 2^30 tokens)
        raise ValueError(reason)


_GROUP_TENSORS: Dict[tuple, torch.Tensor] = {}


def _group_tensor(values: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    """int32 group list on the device, made once per (list, device): no host-to-device copy
    per call (a training step can be captured in a CUDA graph once it has run eagerly)."""
    key = (values, device)
    tensor = _GROUP_TENSORS.get(key)
    if tensor is None:
        if len(_GROUP_TENSORS) >= 1024:  # a bound, not an eviction policy: group lists are few
            _GROUP_TENSORS.clear()
        tensor = _GROUP_TENSORS[key] = torch.tensor(values, dtype=torch.int32, device=device)
    return tensor


def make_problem(q, c, group_rq, group_rc, q_mask, c_mask, interpret: Optional[bool] = None,
                 paired: bool = False, checked: bool = False) -> Problem:
    """Checks the arguments with the validator every backend uses (_validation.check_maxsim_op,
    the same messages everywhere; skipped when the caller already ran a check_*_op), then what
    only triton refuses. paired: c is (B, N, Rc, D) and c_mask (B, N, Rc)."""
    group_rq, group_rc = [int(v) for v in group_rq], [int(v) for v in group_rc]
    if not checked:
        V.check_maxsim_op(q, c, group_rq, group_rc, q_mask, c_mask, paired)
    _check_triton_support(q.dtype, group_rq, group_rc)
    device = q.device
    return Problem(
        q=q.contiguous(), c=c.contiguous(),
        q_mask=_mask_view(q_mask, q.shape[:2], device), c_mask=_mask_view(c_mask, c.shape[:-1], device),
        group_rq=_group_tensor(tuple(group_rq), device), group_rc=_group_tensor(tuple(group_rc), device),
        rq_eff=max(group_rq), rc_eff=max(group_rc),
        interpret=interpret_mode() if interpret is None else interpret,
    )


# ---- per-query candidates (the loss's hard negatives, paired MaxSim's c) -------------------

@dataclasses.dataclass
class OwnCandidates:
    """x (Nq, K, Rc, D): query a's own candidates x[a] -- hard_negatives of the loss, c of
    maxsim_paired_grouped -- with its uint8 mask (Nq, K, Rc), maybe stride 0."""
    x: torch.Tensor  # contiguous
    mask: torch.Tensor

    @property
    def k(self) -> int:
        return self.x.shape[1]

    def args(self) -> Dict[str, Any]:
        x, xm = self.x, self.mask
        return dict(x_ptr=x, x_mask_ptr=xm, n_k=self.k,
                    stride_xa=x.stride(0), stride_xk=x.stride(1), stride_xj=x.stride(2),
                    stride_mxa=xm.stride(0), stride_mxk=xm.stride(1), stride_mxj=xm.stride(2))


def make_hard_negatives(p: Problem, hn: torch.Tensor, hn_mask: Optional[torch.Tensor]) -> OwnCandidates:
    """The loss's hard negatives (checked by make_infonce_problem, or built from meta tensors
    by the compile gate)."""
    return OwnCandidates(hn.contiguous(), _mask_view(hn_mask, hn.shape[:3], p.q.device))


def paired_candidates(p: Problem) -> OwnCandidates:
    """A paired problem's c as every query's own candidates."""
    return OwnCandidates(p.c, p.c_mask)


def _own_args(p: Problem, x: OwnCandidates) -> Dict[str, Any]:
    q, qm = p.q, p.q_mask
    return dict(x.args(), q_ptr=q, q_mask_ptr=qm, group_rq_ptr=p.group_rq, group_rc_ptr=p.group_rc,
                n_q=p.nq, rq_eff=p.rq_eff, rc_eff=p.rc_eff, D=p.d, n_groups=p.num_groups,
                stride_qa=q.stride(0), stride_qi=q.stride(1), stride_mqa=qm.stride(0), stride_mqi=qm.stride(1))


def _own_constexprs(p: Problem, cfg: H.TileConfig, backward: bool, groups_pad: int) -> Dict[str, Any]:
    out = dict(RQ_TILE=cfg.rq_tile, BLOCK_K=cfg.block_c, RC_TILE=cfg.rc_tile, BLOCK_D=cfg.block_d,
               INTERPRET=p.interpret, CHUNKED=cfg.chunked, GROUPS_PAD=groups_pad)
    numerics = H.numerics(p.q.dtype)
    out["DOT_PRECISION"] = numerics["DOT_PRECISION"]
    if backward:
        out.update(BLOCK_DO=cfg.block_do, Q_CHUNKED=cfg.q_chunked, **{k: numerics[k] for k in GRADIENT_NUMERICS})
    return out


def _own_gradient_plans(p: Problem, x: OwnCandidates, dq: Optional[torch.Tensor], want_dx: bool,
                        grad: torch.Tensor, lse: torch.Tensor, scale: float, is_loss: bool,
                        role: str, dx_name: str) -> Tuple[Optional[torch.Tensor], List[LaunchPlan]]:
    """-> (dx or None, own_candidates_backward_kernel launches): a dq pass into the fp32
    accumulator dq when given, one program per query over all its candidate blocks (the only
    writer of dq[a]), and a dx pass when wanted, one program per (query, candidate block).

    dx is the gradient itself, in x's dtype, written once by the kernel (DIRECT), when every dx
    row gets exactly one contribution -- one row chunk (not q_chunked) and one group batch --
    else an fp32 accumulator (several row chunks / launches add into it)."""
    cfg = own_candidate_config(p, backward=True)
    batches = p.group_batches(cfg)
    direct = not cfg.q_chunked and len(batches) == 1
    dx = None
    if want_dx:
        if direct:
            dx = torch.empty(x.x.shape, dtype=x.x.dtype, device=x.x.device)
            dx[:, :, p.rc_eff:].zero_()  # tokens past max r_c: never part of a tile
        else:
            dx = torch.zeros(x.x.shape, dtype=torch.float32, device=x.x.device)
    if x.k == 0:
        return dx, []
    num_k_blocks = _cdiv(x.k, cfg.block_c)
    constexprs = dict(_own_constexprs(p, cfg, True, H.CHUNK_GROUPS), IS_LOSS=is_loss)
    passes = [(output, name, out, grid) for output, name, out, grid in
              (("dq", "dq", dq, p.nq), ("dx", dx_name, dx, p.nq * num_k_blocks)) if out is not None]
    plans = []
    for output, name, out, grid in passes:
        for g0, g1 in batches:
            args = dict(_own_args(p, x), **p.group_args(g0, g1), grad_ptr=grad[g0:g1], lse_ptr=lse[g0:g1],
                        out_ptr=out, scale=float(scale), num_k_blocks=num_k_blocks)
            plans.append(LaunchPlan(f"{role} {name}", K.own_candidates_backward_kernel, (grid,), args,
                                    dict(constexprs, OUTPUT=output, DIRECT=direct and output == "dx"),
                                    grad_query_config(cfg) if output == "dq" else cfg))
    return dx, plans


def _accumulator(like: torch.Tensor, wanted: bool) -> Optional[torch.Tensor]:
    """A zeroed fp32 gradient accumulator of like's shape, or None: nothing is allocated for a
    gradient nobody asked for."""
    return torch.zeros(like.shape, dtype=torch.float32, device=like.device) if wanted else None


# ---- grouped MaxSim -----------------------------------------------------------------------

def plan_maxsim_forward(p: Problem) -> Tuple[torch.Tensor, List[LaunchPlan]]:
    out = torch.empty((p.num_groups, p.nq, p.nc), dtype=torch.float32, device=p.q.device)
    cfg = H.maxsim_forward_config(p.nq, p.rq_eff, p.rc_eff, p.d, p.q.dtype)
    num_q_blocks = _cdiv(p.nq, cfg.block_q)
    grid = (num_q_blocks * _cdiv(p.nc, cfg.block_c),)
    constexprs = dict(p.tile_constexprs(cfg), GROUPS_PAD=H.CHUNK_GROUPS)  # unused unless chunked
    plans = []
    for g0, g1 in p.group_batches(cfg):
        args = dict(p.common_args(), **p.group_args(g0, g1), out_ptr=out[g0:g1], num_q_blocks=num_q_blocks)
        plans.append(LaunchPlan("maxsim forward", K.maxsim_forward_kernel, grid, args, constexprs, cfg))
    return out, plans


def _gradient_plans(p: Problem, dq, dc, grad, lse, labels, scale: float, is_loss: bool) -> List[LaunchPlan]:
    """dq pass(es), then dc pass(es), each only for a wanted (not None) accumulator; grad and
    lse are per group (first dimension G)."""
    cfg = H.gradient_config(p.rq_eff, p.rc_eff, p.d, p.q.dtype)
    constexprs = dict(p.tile_constexprs(cfg, with_gradient_chunk=True), IS_LOSS=is_loss, GROUPS_PAD=H.CHUNK_GROUPS)
    kind = "loss" if is_loss else "maxsim"
    batches = p.group_batches(cfg)
    shared = [dict(p.common_args(), **p.group_args(g0, g1), grad_ptr=grad[g0:g1], lse_ptr=lse[g0:g1],
                   labels_ptr=labels, scale=float(scale)) for g0, g1 in batches]
    plans = []
    if dq is not None:
        dq_cfg = grad_query_config(cfg)
        plans += [LaunchPlan(f"{kind} backward dq", K.grad_query_kernel, (_cdiv(p.nq, cfg.block_q),),
                             dict(args, dq_ptr=dq), constexprs, dq_cfg) for args in shared]
    if dc is not None:
        plans += [LaunchPlan(f"{kind} backward dc", K.grad_candidate_kernel, (_cdiv(p.nc, cfg.block_c),),
                             dict(args, dc_ptr=dc), constexprs, cfg) for args in shared]
    return plans


def plan_maxsim_backward(p: Problem, grad: torch.Tensor, output_mask=(True, True)):
    """grad (G, Nq, Nc) -> fp32 accumulators dq, dc (zeroed; None when not wanted) and the
    launches (none for an unwanted gradient)."""
    V.check_scores_grad(grad, p.q, p.c, p.num_groups)
    grad = grad.to(torch.float32).contiguous()
    dq, dc = _accumulator(p.q, output_mask[0]), _accumulator(p.c, output_mask[1])
    plans = _gradient_plans(p, dq, dc, grad, grad, grad, 1.0, is_loss=False)  # lse/labels unused
    return dq, dc, plans


# ---- paired MaxSim: each query against its own candidates ----------------------------------

def plan_maxsim_paired_forward(p: Problem) -> Tuple[torch.Tensor, List[LaunchPlan]]:
    """scores (G, B, N) of a paired problem: one program per (query, block of its candidates)."""
    x = paired_candidates(p)
    out = torch.empty((p.num_groups, p.nq, x.k), dtype=torch.float32, device=p.q.device)
    cfg = own_candidate_config(p, backward=False)
    num_k_blocks = _cdiv(x.k, cfg.block_c)
    constexprs = _own_constexprs(p, cfg, False, H.CHUNK_GROUPS)  # GROUPS_PAD unused unless chunked
    plans = []
    for g0, g1 in p.group_batches(cfg):
        args = dict(_own_args(p, x), **p.group_args(g0, g1), out_ptr=out[g0:g1], num_k_blocks=num_k_blocks)
        plans.append(LaunchPlan("paired forward", K.maxsim_paired_forward_kernel, (p.nq * num_k_blocks,), args,
                                constexprs, cfg))
    return out, plans


def plan_maxsim_paired_backward(p: Problem, grad: torch.Tensor, output_mask=(True, True)):
    """grad (G, B, N) -> dq (B, Rq, D) (fp32 accumulator), dc (B, N, Rc, D) (fp32 accumulator
    or, see _own_gradient_plans, the gradient in c's dtype), None when not wanted, and the
    launches."""
    V.check_scores_grad(grad, p.q, p.c, p.num_groups, paired=True)
    grad = grad.to(torch.float32).contiguous()
    dq = _accumulator(p.q, output_mask[0])
    dc, plans = _own_gradient_plans(p, paired_candidates(p), dq, output_mask[1], grad, grad, 1.0, is_loss=False,
                                    role="paired backward", dx_name="dc")  # lse unused
    return dq, dc, plans


# ---- fused Matryoshka InfoNCE -----------------------------------------------------------

def make_infonce_problem(q, c, hard_negatives, labels, group_rq, group_rc, scale, q_mask, c_mask, hn_mask,
                         grad: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None,
                         interpret: Optional[bool] = None) -> Tuple[Problem, OwnCandidates, torch.Tensor]:
    """The loss's arguments through the shared validator, in the reference backend's order:
    check_infonce_op, the backward's grad / lse shapes (when given), then the label values
    (host check for CPU tensors, device assert otherwise: no sync)."""
    group_rq, group_rc = [int(v) for v in group_rq], [int(v) for v in group_rc]
    V.check_infonce_op(q, c, hard_negatives, labels, group_rq, group_rc, scale, q_mask, c_mask, hn_mask)
    if grad is not None:
        V.check_infonce_grad(grad, lse, len(group_rq), q.shape[0])
    V.check_label_values(labels, c.shape[0])
    p = make_problem(q, c, group_rq, group_rc, q_mask, c_mask, interpret, checked=True)
    # Labels are compared with candidate indices, never used as addresses.
    return p, make_hard_negatives(p, hard_negatives, hn_mask), labels.contiguous()


def _state_groups_pad(cfg: H.TileConfig, batch: int) -> int:
    """GROUPS_PAD of a loss-forward launch of `batch` groups."""
    return H.CHUNK_GROUPS if cfg.chunked else H.groups_pad(batch)


def plan_infonce_forward(p: Problem, h: OwnCandidates, labels: torch.Tensor, scale: float):
    """-> (lse (G, Nq), positive logit (G, Nq), launches). terms = lse - positive."""
    lse = torch.empty((p.num_groups, p.nq), dtype=torch.float32, device=p.q.device)
    pos = torch.empty_like(lse)
    cfg = H.infonce_forward_config(p.rq_eff, p.rc_eff, p.d, p.q.dtype)
    plans = []
    for g0, g1 in p.group_batches(cfg, carries_state=True):
        constexprs = dict(p.tile_constexprs(cfg), GROUPS_PAD=_state_groups_pad(cfg, g1 - g0))
        args = dict(p.common_args(), **p.group_args(g0, g1), labels_ptr=labels, lse_ptr=lse[g0:g1],
                    pos_ptr=pos[g0:g1], scale=float(scale))
        plans.append(LaunchPlan("loss forward", K.infonce_forward_kernel, (_cdiv(p.nq, cfg.block_q),), args,
                                constexprs, cfg))
    if h.k > 0:  # after the in-batch launches: it continues their lse
        hcfg = own_candidate_config(p, backward=False)
        for g0, g1 in p.group_batches(hcfg, carries_state=True):
            plans.append(LaunchPlan(
                "loss forward hard negatives", K.infonce_hard_negatives_forward_kernel, (p.nq,),
                dict(_own_args(p, h), **p.group_args(g0, g1), lse_ptr=lse[g0:g1], scale=float(scale)),
                _own_constexprs(p, hcfg, False, _state_groups_pad(hcfg, g1 - g0)), hcfg))
    return lse, pos, plans


def plan_infonce_backward(p: Problem, h: OwnCandidates, labels: torch.Tensor, scale: float,
                          grad_terms: torch.Tensor, lse: torch.Tensor, output_mask=(True, True, True)):
    """-> dq, dc (fp32 accumulators), dhn (fp32 accumulator or the gradient in hn's dtype: see
    _own_gradient_plans), None when not wanted (not allocated, not computed), and the launches
    in the order they must run."""
    V.check_infonce_grad(grad_terms, lse, p.num_groups, p.nq)
    grad_terms = grad_terms.to(torch.float32).contiguous()
    lse = lse.to(torch.float32).contiguous()
    dq, dc = _accumulator(p.q, output_mask[0]), _accumulator(p.c, output_mask[1])
    plans = _gradient_plans(p, dq, dc, grad_terms, lse, labels, scale, is_loss=True)
    # after the dq pass: it adds into the same dq rows
    dhn, own_plans = _own_gradient_plans(p, h, dq, output_mask[2], grad_terms, lse, scale, is_loss=True,
                                         role="loss backward hard negatives", dx_name="dhn")
    return dq, dc, dhn, plans + own_plans


def run(plans: Sequence[LaunchPlan]) -> None:
    for plan in plans:
        plan.run()
