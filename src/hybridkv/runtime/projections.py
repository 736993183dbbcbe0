"""Sibling projections of one input as one GEMM, for the engine's decode steps.

transformers' attention modules call ``q_proj``, ``k_proj`` and ``v_proj`` on the same hidden
states, and their MLPs ``gate_proj`` and ``up_proj``: three and two GEMMs where one would do.
At decode sizes (a few hundred rows) each of those GEMMs is short of the memory bandwidth,
the small ``k_proj`` / ``v_proj`` ones most, so one GEMM over the stacked weights reads the
same bytes in fewer, longer launches. Members of one output size (gate / up) run as one
batched GEMM whose output holds each member's result contiguous: column slices of one wide
output leave the elementwise kernels after them (the activation, the product) on strided
tensors, which took twice as long as on contiguous ones on an H200.

``install`` stacks a group's weights (and biases) into one tensor and gives each member a
view of its rows, so the model holds the same bytes and its parameters keep their values and
names. The first member called computes the whole group's output and keeps the others'
columns; a sibling called next on the *same* tensor object returns its columns without a
GEMM (once: a member called again computes anew, and what was kept goes). A member called on
another input, or whose weight is no longer a view in place (the model was moved or reloaded
since), computes its own projection, so a module's forward that calls them in any order, or
only some of them, gives what it gave before.

A group is fused only where every member is a plain ``torch.nn.Linear`` (not a subclass: a
quantized or adapted layer has other weights) taking the same input size, with the same
dtype and device, and biases on all or none.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass
class Group:
    """One fused group: its members, and the columns the last fused GEMM left for siblings."""

    members: list[Any]
    last_input: Any = None
    kept: dict[int, Any] = field(default_factory=dict)


def _stacked(tensors: list[Any]) -> Any:
    """One ``[sum of rows, ...]`` view over ``tensors`` if they lie back to back, contiguous,
    in one storage (as ``install`` left them); else None."""
    first = tensors[0]
    offset = first.storage_offset()
    for t in tensors:
        if not t.is_contiguous() or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() \
                or t.storage_offset() != offset:
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def _member_forward(group: Group, index: int, x: Any) -> Any:
    import torch

    if x is group.last_input and index in group.kept:
        out = group.kept.pop(index)
        if not group.kept:
            group.last_input = None  # (hold no step's tensors past the group's calls)
        return out
    members = group.members
    me = members[index]
    weight = _stacked([m.weight for m in members])
    bias = None if me.bias is None else _stacked([m.bias for m in members])
    if weight is None or (me.bias is not None and bias is None):
        group.last_input, group.kept = None, {}  # (what was kept may be stale now)
        return torch.nn.functional.linear(x, me.weight, me.bias)
    sizes = [m.out_features for m in members]
    if len(set(sizes)) == 1:  # one batched GEMM: each member's output comes out contiguous
        flat = x.reshape(-1, x.shape[-1])
        out = torch.matmul(flat, weight.view(len(members), sizes[0], -1).transpose(1, 2))
        if bias is not None:
            out = out + bias.view(len(members), 1, sizes[0])
        columns = tuple(o.view(*x.shape[:-1], sizes[0]) for o in out.unbind(0))
    else:
        columns = torch.nn.functional.linear(x, weight, bias).split(sizes, dim=-1)
    group.last_input, group.kept = x, {i: c for i, c in enumerate(columns) if i != index}
    return columns[index]


def _fusable(members: list[Any]) -> bool:
    import torch

    first = members[0]
    return all(type(m) is torch.nn.Linear and m.in_features == first.in_features
               and m.weight.dtype == first.weight.dtype and m.weight.device == first.weight.device
               and (m.bias is None) == (first.bias is None) for m in members)


def _stack_in_place(members: list[Any], name: str) -> None:
    """Replace each member's ``name`` parameter by a view of one stacked copy of them all."""
    import torch

    params = [getattr(m, name) for m in members]
    stacked = torch.cat([p.detach() for p in params])
    start = 0
    for m, p in zip(members, params, strict=True):
        setattr(m, name, torch.nn.Parameter(stacked[start:start + p.shape[0]], requires_grad=p.requires_grad))
        start += p.shape[0]


def install(model: Any) -> int:
    """Fuse every group of ``GROUPS`` in ``model``'s modules that can be (again where the model
    was moved or reloaded since: its weights are stacked anew); how many groups run fused."""
    fused = 0
    for module in model.modules():
        for names in GROUPS:
            members: list[Any] = [getattr(module, n, None) for n in names]
            if any(m is None for m in members) or not _fusable(members):
                continue
            params = ("weight", "bias") if members[0].bias is not None else ("weight",)
            unstacked = [n for n in params if _stacked([getattr(m, n) for m in members]) is None]
            # (fused before, but the model moved or reloaded since: stack its weights again)
            if unstacked or not all(_is_fused(m) for m in members):
                for name in unstacked:
                    _stack_in_place(members, name)
                group = Group(members)
                for i, m in enumerate(members):
                    m.forward = functools.partial(_member_forward, group, i)
            fused += 1
    return fused


def _is_fused(module: Any) -> bool:
    forward = module.__dict__.get("forward")
    return isinstance(forward, functools.partial) and forward.func is _member_forward


def uninstall(model: Any) -> int:
    """Give every fused projection of ``model`` its own forward back (its weight stays a view
    of the stacked copy, the same values); how many modules were fused."""
    restored = 0
    for module in model.modules():
        if _is_fused(module):
            del module.forward
            restored += 1
    return restored
