"""What TRL leaves undone on CPU, in one place: the LM head projected only where the loss reads it, the
log-probabilities of those rows computed in fewer passes, and products with frozen weights in bf16 where the CPU has
bf16 units.

TRL's trainers (SFT and DPO) compute per-token log-probabilities through a fused, tiled LM head
(`trl.trainer.utils.add_fused_lm_head`) that never materialises the (batch, length, vocabulary) logits. On CUDA and
XPU it projects only the positions whose label is not -100 (the answer tokens); on every other device it projects
all positions, prompt and padding included, because a varying number of rows would recompile the kernels of
accelerators such as Neuron. CPU kernels do not recompile, and on the embedded model the LM head is most of the
work: its 262,144 x 640 projection costs ~335 MFLOP a token, the 18 transformer layers ~200 MFLOP. So on CPU the
rows the loss never reads are left out here too.

On CPU TRL then runs its GPU kernel's algorithm in torch (`trl.kernels.chunked_logprob`): 32,768-word tiles folded
into running statistics, one more elementwise pass over each tile per optional output, and a backward that projects
every tile again. A few hundred answer rows' full logits fit in memory, so `AnswerLogProbs` projects once and keeps
the softmax for the backward: one elementwise pass and one matrix product instead of the projection done twice.
The log-probabilities are the same numbers up to summation order (`tests/training/test_cpu_speed.py` checks them
and their gradients against TRL's, and `benchmarks/training.py` checks the losses).

LoRA training multiplies by frozen weights almost everywhere: the base layers and the LM head. On CPUs with AMX or
AVX-512 BF16, products of bf16 matrices run 3-4x faster than fp32 ones (`../shared/NOTES.md`), but bf16 throughout
(the model loaded in bf16, TRL's `bf16=True`) was no faster on 2 cores and trained differently: the bf16 residual
stream rounds away LoRA's small updates, and autocast casts every frozen weight again at every call.
`frozen_matmuls_in_bf16` instead multiplies by a bf16 copy of each frozen weight, made once, and keeps everything
else fp32. Rounding the products' inputs and results to 8 significant bits changes per-step losses by about 1%
(`benchmarks/training.py --speedups` prints the difference); the setting `bf16_matmuls: false` turns it off.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Values of logits (rows x vocabulary) projected at once, and of softmax kept per batch for the backward; past the
# second, TRL's tiled function runs instead. The embedded model's 262,144-word vocabulary: 128 rows a projection, whose
# temporaries (logits, exponentials: ~0.4 GB) stay small beside the kept softmax, at no measured cost in speed.
ROWS_BUDGET = 2**25  # 128 MiB of fp32
KEPT_BUDGET = 2**29  # 2 GiB of fp32


@contextlib.contextmanager
def lm_head_on_answer_positions(enabled: bool = True) -> Iterator[bool]:
    """Within the block, TRL's fused LM head projects only labelled positions on CPU as it does on CUDA, through
    `AnswerLogProbs`; yields whether it does (False when disabled, or when this TRL has no fused LM head to steer)."""
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:  # pragma: no cover - TRL is a dependency
        yield False
        return
    choose_compact = getattr(trl_utils, "_use_triton", None)
    tiled = getattr(trl_utils, "_ChunkedLogProbFunction", None)
    if not enabled or choose_compact is None or tiled is None:
        if enabled:
            logger.info("this TRL has no fused LM head switch (trl.trainer.utils._use_triton): all positions projected")
        yield False
        return

    # TRL reads this switch only to choose compact rows in the fused LM head; its kernels consult their own copy in
    # trl.kernels.chunked_logprob, so off CPU they keep running as before.
    def compact_on_cpu_too(device):
        return device.type == "cpu" or choose_compact(device)

    trl_utils._use_triton = compact_on_cpu_too
    trl_utils._ChunkedLogProbFunction = _OnCpu(tiled)
    try:
        yield True
    finally:
        trl_utils._use_triton = choose_compact
        trl_utils._ChunkedLogProbFunction = tiled


class Bf16Copies:
    """bf16 copies of frozen fp32 weights, each made on first use and remade if its weight changes in place."""

    def __init__(self) -> None:
        self.copies: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}

    def of(self, weight: torch.Tensor) -> torch.Tensor:
        found = self.copies.get(id(weight))
        if found is None or found[0] is not weight or found[1] != weight._version:
            found = (weight, weight._version, weight.detach().to(torch.bfloat16))
            self.copies[id(weight)] = found
        return found[2]


_bf16_copies: Bf16Copies | None = None  # set within `frozen_matmuls_in_bf16`


def bf16_copy_for(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """The bf16 copy to multiply `x` by instead of `weight`, within `frozen_matmuls_in_bf16` where both are fp32 on
    CPU, the weight is frozen and no autocast chooses dtypes; else None."""
    use = (
        _bf16_copies is not None
        and not weight.requires_grad
        and weight.dtype == x.dtype == torch.float32
        and weight.device.type == x.device.type == "cpu"
        and not torch.is_autocast_enabled("cpu")
    )
    return _bf16_copies.of(weight) if use else None


def _bf16_linear_forward(module: torch.nn.Linear, fp32_forward: Any) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        low = bf16_copy_for(module.weight, x)
        if low is None:
            return fp32_forward(x)
        bias = module.bias
        if bias is not None:  # a frozen bias is copied once, as the weight is; one that trains is cast in the graph
            bias = bias.to(torch.bfloat16) if bias.requires_grad else _bf16_copies.of(bias)  # type: ignore[union-attr]
        return torch.nn.functional.linear(x.to(torch.bfloat16), low, bias).to(x.dtype)

    return forward


@contextlib.contextmanager
def frozen_matmuls_in_bf16(model: torch.nn.Module, enabled: bool = True) -> Iterator[bool]:
    """Within the block, products with `model`'s frozen fp32 weights run in bf16: its linear layers (LoRA's base
    layers; LoRA's own layers never) and, in `AnswerLogProbs`, the LM head. On a CPU with AMX or AVX-512 BF16 such a
    product is 3-4x faster than in fp32. It accumulates in fp32, but its inputs and result are rounded to bf16 (8
    significant bits); the residual stream, norms, attention, softmax, the LoRA weights and their gradients stay fp32.
    Yields whether it is on."""
    global _bf16_copies
    if not enabled:
        yield False
        return
    swapped = []
    for name, module in model.named_modules():
        lora_layer = any(part.startswith("lora_") for part in name.split("."))
        if type(module) is torch.nn.Linear and not lora_layer and "forward" not in vars(module):
            module.forward = _bf16_linear_forward(module, module.forward)
            swapped.append(module)
    _bf16_copies = Bf16Copies()
    try:
        yield True
    finally:
        _bf16_copies = None
        for module in swapped:
            del module.forward


class _OnCpu:
    """Stands in for TRL's `ChunkedLogProbFunction` at its one call site: `AnswerLogProbs` for CPU rows that fit,
    TRL's function for everything else (accelerators, soft-capped logits, autocast, more rows than KEPT_BUDGET)."""

    def __init__(self, tiled: Any) -> None:
        self.tiled = tiled

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0,
              outputs=("log_probs",)):  # fmt: skip
        ours = (
            hidden.device.type == "cpu"
            and softcap is None
            and not torch.is_autocast_enabled("cpu")
            and hidden.shape[0] * weight.shape[0] <= KEPT_BUDGET
        )
        function = AnswerLogProbs if ours else self.tiled
        return function.apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs)


class AnswerLogProbs(torch.autograd.Function):
    """TRL's `ChunkedLogProbFunction` (same arguments, same outputs) for CPU: each block of rows is projected once,
    its softmax kept for the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0,
                outputs=("log_probs",)):  # fmt: skip
        ctx.set_materialize_grads(False)
        keep = any(ctx.needs_input_grad[:3])  # grad mode is off inside forward; this says whether backward runs
        scale = logit_scale / temperature
        columns = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
        found: dict[str, list[torch.Tensor]] = {name: [] for name in columns}
        probs = []
        rows = max(1, ROWS_BUDGET // weight.shape[0])
        low = bf16_copy_for(weight, hidden) if bias is None else None  # the LM head's bf16 copy, if it has one
        for start in range(0, hidden.shape[0], rows):
            target = targets[start : start + rows]
            if low is None:
                z = hidden[start : start + rows] @ weight.t()  # in the model's dtype, as TRL's tiles are
            else:
                z = hidden[start : start + rows].to(torch.bfloat16) @ low.t()
            if bias is not None:
                z += bias
            z = z.float()
            if scale != 1.0:
                z.mul_(scale)
            top = z.amax(-1)
            target_z = z.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            if low is not None:  # the target's own logit in fp32, in the normaliser too; only other words' are rounded
                target_z = torch.linalg.vecdot(hidden[start : start + rows].float(), weight[target].float()) * scale
            if "mean_logits" in outputs:
                found["mean_logits"].append(z.mean(-1))
            if "is_top1" in outputs:
                found["is_top1"].append(first_maximum(z, target, target_z >= top))
            shifted = z.sub_(top.unsqueeze(-1))
            if low is not None:  # where the target dominates the normaliser, its rounding would be the error
                shifted.scatter_(-1, target.unsqueeze(-1), (target_z - top).unsqueeze(-1))
            exp = shifted.exp()
            total = exp.sum(-1)
            log_total = total.log()
            log_probs = target_z - top - log_total
            found["log_probs"].append(log_probs if low is None else log_probs.clamp_(max=0.0))
            if "entropy" in outputs:  # -sum p log p, with p = exp / total and log p = shifted - log total
                found["entropy"].append(log_total - torch.linalg.vecdot(exp, shifted) / total)
            del z, shifted
            p = exp.div_(total.unsqueeze(-1))
            if "log_sum_sq_probs" in outputs:
                found["log_sum_sq_probs"].append(torch.linalg.vecdot(p, p).log())
            if keep:
                probs.append(p if low is None else p.to(torch.bfloat16))  # the backward's product is bf16 then
        joined = [torch.cat(found[name]) if found[name] else None for name in columns]
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.probs, ctx.scale, ctx.entropy, ctx.low = probs, scale, joined[1], low
        ctx.log_probs = joined[0].detach()  # detached: an output held by its own node would be a reference cycle
        ctx.mark_non_differentiable(*(x for x in joined[2:] if x is not None))
        return tuple(joined)

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, *_):  # type: ignore[override]
        if ctx.probs is None:
            raise RuntimeError("AnswerLogProbs keeps its softmax for one backward only")
        hidden, weight, bias, targets = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32) if ctx.needs_input_grad[2] else None
        # Only the hidden states' gradient, through the bf16 product: d log p_target / dz = 1[target] - p is formed
        # in bf16 straight from the kept softmax, written over it. The target's entry, where 1 - p cancels, is formed
        # in fp32 from the log-probability returned, and rounded once.
        only_hidden_in_bf16 = (
            ctx.low is not None and grad_hidden is not None and grad_weight is None and grad_bias is None
            and grad_logprobs is not None and grad_entropy is None
        )  # fmt: skip
        start = 0
        for p in ctx.probs:
            end = start + p.shape[0]
            if only_hidden_in_bf16:
                g = grad_logprobs[start:end].float().unsqueeze(-1) * ctx.scale
                grad_z = p.mul_(-g.to(torch.bfloat16))
                at_target = -torch.expm1(ctx.log_probs[start:end].unsqueeze(-1)) * g
                grad_z.scatter_(-1, targets[start:end].unsqueeze(-1), at_target.to(torch.bfloat16))
                grad_hidden[start:end] = (grad_z @ ctx.low).to(hidden.dtype)
                start = end
                continue
            p = p.float()  # a copy of a bf16 softmax; p itself otherwise, written over below
            grad_z = None
            if grad_entropy is not None:
                # d entropy / dz_j = -p_j (log p_j + entropy); first, because the next term is written over p
                entropy = ctx.entropy[start:end].unsqueeze(-1)
                grad_z = (torch.special.xlogy(p, p) + p * entropy).mul_(-grad_entropy[start:end].float().unsqueeze(-1))
            if grad_logprobs is not None:
                # d log p_target / dz_j = 1[j = target] - p_j
                g = grad_logprobs[start:end].float().unsqueeze(-1)
                term = p.mul_(-g).scatter_add_(-1, targets[start:end].unsqueeze(-1), g)
                grad_z = term if grad_z is None else grad_z.add_(term)
            if grad_z is None:
                grad_z = torch.zeros_like(p)
            grad_z.mul_(ctx.scale)
            if grad_hidden is not None and ctx.low is None:
                grad_hidden[start:end] = grad_z.to(weight.dtype) @ weight
            elif grad_hidden is not None:
                grad_hidden[start:end] = (grad_z.to(torch.bfloat16) @ ctx.low).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += grad_z.t() @ hidden[start:end].float()
            if grad_bias is not None:
                grad_bias += grad_z.sum(0)
            start = end
        ctx.probs = ctx.log_probs = None
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def first_maximum(logits: torch.Tensor, targets: torch.Tensor, at_maximum: torch.Tensor) -> torch.Tensor:
    """Whether each row's target is its first maximal logit (TRL's `is_top1`: a tie with an earlier word does not
    count). `at_maximum` (target logit == row maximum) decides most rows; `argmax` runs on those rows only."""
    first = at_maximum.clone()
    rows = at_maximum.nonzero().squeeze(-1)
    if rows.numel():
        first[rows] = logits[rows].argmax(-1) == targets[rows]
    return first
