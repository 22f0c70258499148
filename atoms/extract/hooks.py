"""Hooked, truncated forwards: activations at several (site, layer) points in one pass.

Sites (layer l counts blocks from 0):
  resid_post  the residual stream after block l (the block's output hidden state)
  mlp_key     the input of block l's MLP down projection (the MLP "keys")
  mlp_out     the output of block l's MLP module
The forward stops right after the deepest hooked block: later blocks and the LM head never run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from atoms.core.errors import InputError
from atoms.extract.models import transformer_layers
from atoms.extract.shards import SITES

POSITIONS = ("all", "no_bos", "last")

# Name of the MLP's down projection in each supported block layout.
_DOWN_PROJ = ("down_proj", "c_proj", "dense_4h_to_h")


@dataclass(frozen=True)
class HookPoint:
    site: str
    layer: int

    def __str__(self) -> str:
        return f"{self.site}/layer_{self.layer}"


class _StopForward(Exception):
    """Raised by the deepest hook to end the forward early."""


def _down_projection(mlp: nn.Module, layer: int) -> nn.Module:
    for name in _DOWN_PROJ:
        if isinstance(getattr(mlp, name, None), nn.Module):
            return getattr(mlp, name)
    raise InputError(f"layer {layer}: MLP {type(mlp).__name__} has no down projection "
                     f"(looked for {', '.join(_DOWN_PROJ)})")


def check_hook_points(model: nn.Module, points: Sequence[HookPoint]) -> None:
    """Reject unknown sites and layers out of range with one line each."""
    if not points:
        raise InputError("no hook points given")
    n_layers = len(transformer_layers(model))
    for p in points:
        if p.site not in SITES:
            raise InputError(f"site {p.site!r} is unknown (choose from {', '.join(SITES)})")
        if not 0 <= p.layer < n_layers:
            raise InputError(
                f"layer {p.layer} out of range: the model has {n_layers} layers (0..{n_layers - 1})"
            )


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def hooked_forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    points: Sequence[HookPoint],
    attention_mask: torch.Tensor | None = None,
) -> dict[HookPoint, torch.Tensor]:
    """(B, T, d) activations at every hook point, from one forward that stops early."""
    check_hook_points(model, points)
    blocks = transformer_layers(model)
    deepest = max(p.layer for p in points)
    captured: dict[HookPoint, torch.Tensor] = {}
    handles = []

    def keep(point):
        def hook(module, args, output=None):
            value = _first(args) if output is None else _first(output)
            captured[point] = value.detach()

        return hook

    def stop(module, args, output):
        raise _StopForward

    try:
        for p in points:
            block = blocks[p.layer]
            if p.site == "resid_post":
                handles.append(block.register_forward_hook(keep(p)))
            elif p.site == "mlp_out":
                handles.append(block.mlp.register_forward_hook(keep(p)))
            else:
                down = _down_projection(block.mlp, p.layer)
                handles.append(down.register_forward_pre_hook(keep(p)))
        # Registered last on the deepest block, so it runs after that block's capture hooks.
        handles.append(blocks[deepest].register_forward_hook(stop))
        with torch.inference_mode():
            try:
                model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return captured


def position_mask(input_ids: torch.Tensor, positions: str, bos_id: int | None) -> torch.Tensor:
    """Bool (B, T): which token positions to keep.

    all: every token; no_bos: every token except a BOS at position 0; last: the final token.
    """
    if positions not in POSITIONS:
        raise InputError(f"positions {positions!r} is unknown (choose from {', '.join(POSITIONS)})")
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    if positions == "no_bos" and bos_id is not None:
        mask[:, 0] = input_ids[:, 0] != bos_id
    elif positions == "last":
        mask.zero_()
        mask[:, -1] = True
    return mask


@dataclass
class ExtractedRows:
    """Selected activations of one batch, flattened to rows in (window, position) order."""

    activations: dict[HookPoint, torch.Tensor]
    token_ids: torch.Tensor
    window_index: torch.Tensor
    positions: torch.Tensor


def extract_rows(
    model: nn.Module,
    input_ids: torch.Tensor,
    points: Sequence[HookPoint],
    positions: str = "all",
    bos_id: int | None = None,
    keep: torch.Tensor | None = None,
) -> ExtractedRows:
    """Run ``hooked_forward`` and keep the selected positions of every hook point: those of
    ``positions``, or the True ones of ``keep`` (B, T) when given (fact prompts)."""
    device = next(model.parameters()).device
    acts = hooked_forward(model, input_ids.to(device), points)
    mask = position_mask(input_ids, positions, bos_id) if keep is None else keep
    where = mask.nonzero()
    flat = {p: a.float()[mask.to(a.device)].cpu() for p, a in acts.items()}
    return ExtractedRows(flat, input_ids[mask], where[:, 0], where[:, 1])
