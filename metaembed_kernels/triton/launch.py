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


def _mask_view(mask: Optional[torch.Tensor], shape: Sequence[int], device) -> torch.Tensor:
    """uint8 view of a bool mask; None -> all-true, as a stride-0 view (no allocation)."""
    if mask is None:
        return torch.ones((1,) * len(shape), dtype=torch.uint8, device=device).expand(*shape)
    return mask.contiguous().view(torch.uint8)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass
class Problem:
    """Checked, contiguous inputs and the derived sizes shared by every launch."""
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


def _check_groups(group_rq: Sequence[int], group_rc: Sequence[int], rq: int, rc: int) -> None:
    if len(group_rq) != len(group_rc) or len(group_rq) == 0:
        raise ValueError(f"group_rq and group_rc must be non-empty and of equal length, got {list(group_rq)}, "
                         f"{list(group_rc)}")
    for r_q, r_c in zip(group_rq, group_rc):
        if not (1 <= r_q <= rq and 1 <= r_c <= rc):
            raise ValueError(f"group ({r_q}, {r_c}) out of range: need 1 <= r_q <= Rq={rq}, 1 <= r_c <= Rc={rc}")


def _check_mask(name: str, mask: Optional[torch.Tensor], shape: Tuple[int, ...], device) -> None:
    if mask is None:
        return
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(shape) or mask.device != device:
        raise ValueError(f"{name} must be a bool tensor of shape {tuple(shape)} on {device}, got "
                         f"{mask.dtype} {tuple(mask.shape)} on {mask.device}")


def make_problem(q, c, group_rq, group_rc, q_mask, c_mask, interpret: Optional[bool] = None) -> Problem:
    """Re-checks what memory safety depends on (the ops can be called directly)."""
    if q.dim() != 3 or c.dim() != 3 or q.shape[2] != c.shape[2] or q.dtype != c.dtype or q.device != c.device:
        raise ValueError(f"q (Nq, Rq, D) and c (Nc, Rc, D) must agree in D, dtype and device, got "
                         f"{tuple(q.shape)} {q.dtype} {q.device} and {tuple(c.shape)} {c.dtype} {c.device}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the triton backend runs float32, float16 and bfloat16, got {q.dtype}")
    group_rq, group_rc = [int(v) for v in group_rq], [int(v) for v in group_rc]
    _check_groups(group_rq, group_rc, q.shape[1], c.shape[1])
    _check_mask("q_mask", q_mask, q.shape[:2], q.device)
    _check_mask("c_mask", c_mask, c.shape[:2], q.device)
    reason = H.unsupported_reason(max(group_rq), max(group_rc))
    if reason is not None:  # only absurd budgets (>= 2^30 tokens)
        raise ValueError(reason)
    device = q.device
    return Problem(
        q=q.contiguous(), c=c.contiguous(),
        q_mask=_mask_view(q_mask, q.shape[:2], device), c_mask=_mask_view(c_mask, c.shape[:2], device),
        group_rq=torch.tensor(group_rq, dtype=torch.int32, device=device),
        group_rc=torch.tensor(group_rc, dtype=torch.int32, device=device),
        rq_eff=max(group_rq), rc_eff=max(group_rc),
        interpret=interpret_mode() if interpret is None else interpret,
    )


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


def _gradient_plans(p: Problem, dq, dc, grad, lse, labels, scale: float, is_loss: bool,
                    output_mask=(True, True)) -> List[LaunchPlan]:
    """dq pass(es), then dc pass(es), each only when wanted; grad and lse are per group
    (first dimension G)."""
    cfg = H.gradient_config(p.rq_eff, p.rc_eff, p.d, p.q.dtype)
    constexprs = dict(p.tile_constexprs(cfg, with_gradient_chunk=True), IS_LOSS=is_loss, GROUPS_PAD=H.CHUNK_GROUPS)
    kind = "loss" if is_loss else "maxsim"
    batches = p.group_batches(cfg)
    shared = [dict(p.common_args(), **p.group_args(g0, g1), grad_ptr=grad[g0:g1], lse_ptr=lse[g0:g1],
                   labels_ptr=labels, scale=float(scale)) for g0, g1 in batches]
    plans = []
    if output_mask[0]:
        plans += [LaunchPlan(f"{kind} backward dq", K.grad_query_kernel, (_cdiv(p.nq, cfg.block_q),),
                             dict(args, dq_ptr=dq), constexprs, cfg) for args in shared]
    if output_mask[1]:
        plans += [LaunchPlan(f"{kind} backward dc", K.grad_candidate_kernel, (_cdiv(p.nc, cfg.block_c),),
                             dict(args, dc_ptr=dc), constexprs, cfg) for args in shared]
    return plans


def plan_maxsim_backward(p: Problem, grad: torch.Tensor, output_mask=(True, True)):
    """grad (G, Nq, Nc) float32 -> fp32 accumulators dq, dc (zeroed) and the launches."""
    grad = grad.to(torch.float32).contiguous()
    if tuple(grad.shape) != (p.num_groups, p.nq, p.nc):
        raise ValueError(f"grad must have shape (G, Nq, Nc) = {(p.num_groups, p.nq, p.nc)}, got {tuple(grad.shape)}")
    dq = torch.zeros(p.q.shape, dtype=torch.float32, device=p.q.device)
    dc = torch.zeros(p.c.shape, dtype=torch.float32, device=p.q.device)
    plans = _gradient_plans(p, dq, dc, grad, grad, grad, 1.0, is_loss=False,
                            output_mask=output_mask)  # lse/labels unused
    return dq, dc, plans


# ---- fused Matryoshka InfoNCE -----------------------------------------------------------

@dataclasses.dataclass
class HardNegatives:
    hn: torch.Tensor  # (Nq, K, Rc, D) contiguous
    mask: torch.Tensor  # uint8 (Nq, K, Rc), maybe stride 0

    @property
    def k(self) -> int:
        return self.hn.shape[1]

    def args(self) -> Dict[str, Any]:
        hn, hm = self.hn, self.mask
        return dict(hn_ptr=hn, hn_mask_ptr=hm, n_k=self.k,
                    stride_ha=hn.stride(0), stride_hk=hn.stride(1), stride_hj=hn.stride(2),
                    stride_mha=hm.stride(0), stride_mhk=hm.stride(1), stride_mhj=hm.stride(2))


def make_hard_negatives(p: Problem, hn: torch.Tensor, hn_mask: Optional[torch.Tensor]) -> HardNegatives:
    expected = (p.nq, hn.shape[1] if hn.dim() == 4 else -1, p.c.shape[1], p.d)
    if hn.dim() != 4 or tuple(hn.shape) != expected or hn.dtype != p.q.dtype or hn.device != p.q.device:
        raise ValueError(f"hard_negatives must be (Nq, K, Rc, D) = (.., K, ..) {expected} with q's dtype and "
                         f"device, got {tuple(hn.shape)} {hn.dtype} {hn.device}")
    _check_mask("hard_negatives_mask", hn_mask, hn.shape[:3], p.q.device)
    return HardNegatives(hn.contiguous(), _mask_view(hn_mask, hn.shape[:3], p.q.device))


def _check_labels(p: Problem, labels: torch.Tensor) -> torch.Tensor:
    # Labels are compared with candidate indices, never used as addresses; their values are
    # checked by the shared validator (host check for CPU tensors, device assert on GPUs).
    if labels.dtype != torch.int64 or tuple(labels.shape) != (p.nq,) or labels.device != p.q.device:
        raise ValueError(f"labels must be int64 of shape ({p.nq},) on {p.q.device}, got "
                         f"{labels.dtype} {tuple(labels.shape)} on {labels.device}")
    V.check_label_values(labels, p.nc)
    return labels.contiguous()


def _hard_negative_args(p: Problem, h: HardNegatives) -> Dict[str, Any]:
    q, qm = p.q, p.q_mask
    return dict(h.args(), q_ptr=q, q_mask_ptr=qm, group_rq_ptr=p.group_rq, group_rc_ptr=p.group_rc,
                n_q=p.nq, rq_eff=p.rq_eff, rc_eff=p.rc_eff, D=p.d, n_groups=p.num_groups,
                stride_qa=q.stride(0), stride_qi=q.stride(1), stride_mqa=qm.stride(0), stride_mqi=qm.stride(1))


def _hard_negative_constexprs(p: Problem, cfg: H.TileConfig, backward: bool, groups_pad: int) -> Dict[str, Any]:
    out = dict(RQ_TILE=cfg.rq_tile, BLOCK_K=cfg.block_c, RC_TILE=cfg.rc_tile, BLOCK_D=cfg.block_d,
               INTERPRET=p.interpret, CHUNKED=cfg.chunked, GROUPS_PAD=groups_pad)
    numerics = H.numerics(p.q.dtype)
    out["DOT_PRECISION"] = numerics["DOT_PRECISION"]
    if backward:
        out.update(BLOCK_DO=cfg.block_do, Q_CHUNKED=cfg.q_chunked, **{k: numerics[k] for k in GRADIENT_NUMERICS})
    return out


def _state_groups_pad(cfg: H.TileConfig, batch: int) -> int:
    """GROUPS_PAD of a loss-forward launch of `batch` groups."""
    return H.CHUNK_GROUPS if cfg.chunked else H.groups_pad(batch)


def plan_infonce_forward(p: Problem, h: HardNegatives, labels: torch.Tensor, scale: float):
    """-> (lse (G, Nq), positive logit (G, Nq), launches). terms = lse - positive."""
    labels = _check_labels(p, labels)
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
        hcfg = H.hard_negative_config(p.rq_eff, p.rc_eff, p.d, p.q.dtype, backward=False)
        for g0, g1 in p.group_batches(hcfg, carries_state=True):
            plans.append(LaunchPlan(
                "loss forward hard negatives", K.infonce_hard_negatives_forward_kernel, (p.nq,),
                dict(_hard_negative_args(p, h), **p.group_args(g0, g1), lse_ptr=lse[g0:g1], scale=float(scale)),
                _hard_negative_constexprs(p, hcfg, False, _state_groups_pad(hcfg, g1 - g0)), hcfg))
    return lse, pos, plans


def plan_infonce_backward(p: Problem, h: HardNegatives, labels: torch.Tensor, scale: float,
                          grad_terms: torch.Tensor, lse: torch.Tensor, output_mask=(True, True, True)):
    """-> fp32 accumulators dq, dc, dhn and the launches, in the order they must run."""
    labels = _check_labels(p, labels)
    shape = (p.num_groups, p.nq)
    grad_terms = grad_terms.to(torch.float32).contiguous()
    lse = lse.to(torch.float32).contiguous()
    if tuple(grad_terms.shape) != shape or tuple(lse.shape) != shape:
        raise ValueError(f"grad and lse must have shape (G, Nq) = {shape}, got {tuple(grad_terms.shape)}, "
                         f"{tuple(lse.shape)}")
    dq = torch.zeros(p.q.shape, dtype=torch.float32, device=p.q.device)
    dc = torch.zeros(p.c.shape, dtype=torch.float32, device=p.q.device)
    dhn = torch.zeros(h.hn.shape, dtype=torch.float32, device=p.q.device)
    plans = _gradient_plans(p, dq, dc, grad_terms, lse, labels, scale, is_loss=True,
                            output_mask=(output_mask[0], output_mask[1]))
    if h.k > 0 and (output_mask[0] or output_mask[2]):  # after the dq pass: it adds into the same dq rows
        hcfg = H.hard_negative_config(p.rq_eff, p.rc_eff, p.d, p.q.dtype, backward=True)
        for g0, g1 in p.group_batches(hcfg):
            plans.append(LaunchPlan(
                "loss backward hard negatives", K.infonce_hard_negatives_backward_kernel, (p.nq,),
                dict(_hard_negative_args(p, h), **p.group_args(g0, g1), grad_ptr=grad_terms[g0:g1],
                     lse_ptr=lse[g0:g1], dq_ptr=dq, dhn_ptr=dhn, scale=float(scale)),
                _hard_negative_constexprs(p, hcfg, True, H.CHUNK_GROUPS), hcfg))
    return dq, dc, dhn, plans


def run(plans: Sequence[LaunchPlan]) -> None:
    for plan in plans:
        plan.run()
