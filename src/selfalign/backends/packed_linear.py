"""Inference through bf16 linear layers with their weights packed once for oneDNN.

On CPU, `F.linear` on bf16 tensors hands oneDNN the weight in PyTorch's plain layout at every call. Packing it once
into oneDNN's own layout (`torch.ops.mkldnn._reorder_linear_weight`, as inductor's freezing pass does for CPU) and
multiplying with `torch.ops.mkldnn._linear_pointwise` was faster on the embedded model (2-core machine, 2026-12-02):
the 262,144 x 640 LM head at 128 rows 65.6 ms against 94.7, a 2048 x 640 projection at 25 rows 194 us against 265,
and greedy generation 1.19x as fast at batch 32 and 1.11x at batch 128, every answer the same
(`benchmarks/generation.py --packed`).

The outputs must not change, so each layer is checked when it is packed: on probe inputs the packed product must
equal `F.linear`'s bit for bit, or the layer keeps `F.linear` (fp32 weights, which `F.linear` sends to another
library; another CPU or build). A packed layer also falls back to `F.linear` under autograd (the packed product has
no gradient), and goes back to `F.linear` for good once its weight has changed in place (the copy would be stale).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

PACKED = "_selfalign_packed_weight"  # on a packed layer: (weight it was packed from, weight._version, packed copy)


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack_linear_layers(model: torch.nn.Module, batch_size: int = 32) -> int:
    """Give each bf16 `nn.Linear` of `model` on CPU a packed copy of its weight, used at inference where it gives the
    same outputs as `F.linear`; returns how many layers were packed. Packing twice is a no-op."""
    if not packing_available():
        return 0
    packed = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear or PACKED in vars(module):
            continue
        weight = module.weight
        if weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
            continue
        if not _pack(module, batch_size):
            continue
        module.forward = _packed_forward(module, module.forward)
        packed += 1
    logger.info("packed %d bf16 linear layers for oneDNN", packed)
    return packed


def unpack_linear_layers(model: torch.nn.Module) -> int:
    """Undo `pack_linear_layers`: every layer multiplies with `F.linear` again; returns how many were packed."""
    layers = [module for module in model.modules() if PACKED in vars(module)]
    for module in layers:
        _unpack(module)
    return len(layers)


def _unpack(module: torch.nn.Module) -> None:
    delattr(module, PACKED)
    del module.forward  # the class's forward again


def _pack(module: torch.nn.Linear, batch_size: int) -> bool:
    """Pack `module`'s weight if the packed product equals F.linear's bit for bit on probe inputs."""
    weight, bias = module.weight.detach(), None if module.bias is None else module.bias.detach()
    try:
        copy = torch.ops.mkldnn._reorder_linear_weight(weight, batch_size)
    except RuntimeError as exc:  # a shape or build oneDNN does not take
        logger.info("linear layer %s not packed: %s", tuple(weight.shape), exc)
        return False
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for shape in ((1, weight.shape[1]), (3, 5, weight.shape[1])):
            probe = torch.randn(shape, generator=generator).to(torch.bfloat16)
            expected = torch.nn.functional.linear(probe, weight, bias)
            if not torch.equal(_multiply(probe, copy, bias), expected):
                return False
    setattr(module, PACKED, (module.weight, module.weight._version, copy))
    return True


def _multiply(x: torch.Tensor, copy: Any, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, copy, bias, "none", [], "")


def _packed_forward(module: torch.nn.Linear, plain_forward: Any) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        weight, version, copy = getattr(module, PACKED)
        if torch.is_grad_enabled() or x.dtype != torch.bfloat16 or x.device.type != "cpu":
            return plain_forward(x)
        if weight is not module.weight or version != module.weight._version:
            _unpack(module)
            return plain_forward(x)
        bias = module.bias
        return _multiply(x, copy, None if bias is None else bias.detach())

    return forward
