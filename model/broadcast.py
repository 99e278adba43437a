"""Rank 0's checkpoint state to every rank, over torch.distributed, without pickle.

On many machines only global rank 0 (node 0) writes checkpoints, so the other nodes
resume from the state rank 0 loaded: at every (re)start of a round, rank 0 reads its
newest checkpoint and broadcasts it. A checkpoint state is tensors and plain values
(model/checkpoint.py's rule), so it travels as a JSON skeleton (the plain values, and
the dtype and shape of each tensor in its place) followed by the tensors themselves, in
the skeleton's order. torch.save's bytes would be pickle on a socket: never.
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

__all__ = ["broadcast_state"]


def broadcast_state(state: dict | None, device: torch.device, src: int = 0) -> dict | None:
    """Collective: every rank calls it; rank `src` passes its state (or None: there is
    no checkpoint), the others anything. Returns rank src's state on every rank, its
    tensors on `device` (what map_location=device gives when loading a file)."""
    tensors: list[torch.Tensor] = []
    skeleton = _encode(state, tensors) if dist.get_rank() == src else None
    text = json.dumps(skeleton).encode() if dist.get_rank() == src else b""
    length = torch.tensor([len(text)], dtype=torch.int64, device=device)
    dist.broadcast(length, src)
    payload = torch.zeros(int(length), dtype=torch.uint8, device=device)
    if dist.get_rank() == src:
        payload.copy_(torch.frombuffer(bytearray(text), dtype=torch.uint8))
    dist.broadcast(payload, src)
    skeleton = json.loads(bytes(payload.cpu().numpy()).decode())
    if dist.get_rank() != src:
        tensors = [torch.empty(shape, dtype=getattr(torch, dtype), device=device) for dtype, shape in _specs(skeleton)]
    for i, tensor in enumerate(tensors):
        moved = tensor.to(device).contiguous()
        dist.broadcast(moved, src)
        tensors[i] = moved
    return _decode(skeleton, iter(tensors))


def _encode(value, tensors: list):
    """Plain values as they are; a tensor as {"tensor": [dtype, shape]}; a dict as a
    list of [key, value] pairs (JSON would turn the optimizer's int keys into str)."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return {"tensor": [str(value.dtype).removeprefix("torch."), list(value.shape)]}
    if isinstance(value, dict):
        return {"dict": [[k, _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"list": [_encode(v, tensors) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"cannot broadcast a {type(value).__name__} in a checkpoint state")


def _specs(node):
    """(dtype, shape) of every tensor in the skeleton, in order."""
    if "tensor" in node:
        yield tuple(node["tensor"])
    elif "dict" in node:
        for _, v in node["dict"]:
            yield from _specs(v)
    elif "list" in node:
        for v in node["list"]:
            yield from _specs(v)


def _decode(node, tensors):
    if "tensor" in node:
        return next(tensors)
    if "dict" in node:
        return {k: _decode(v, tensors) for k, v in node["dict"]}
    if "list" in node:
        return [_decode(v, tensors) for v in node["list"]]
    return node["value"]
