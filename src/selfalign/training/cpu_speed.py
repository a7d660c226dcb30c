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
every tile again. A few hundred answer rows' softmax fits in memory, so `AnswerLogProbs` projects once and keeps it
for the backward: one elementwise pass and one matrix product instead of the projection done twice. It projects the
vocabulary in slices narrow enough for every row's logits to stay in the cores' caches through the passes over them,
which reads the LM head's weight once a call (blocks of rows over the whole vocabulary read it once a block).
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

# Values of logits (rows x words) projected at once, in slices of at least MIN_SLICE words; and of softmax kept per
# batch for the backward, past which TRL's tiled function runs instead.
SLICE_BUDGET = 2**20  # 4 MiB of fp32
MIN_SLICE = 2048
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
    frozen_layers = [
        module
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and not any(part.startswith("lora_") for part in name.split("."))
    ]
    with forwards_replaced(frozen_layers, lambda module: _bf16_linear_forward(module, module.forward)):
        _bf16_copies = Bf16Copies()
        try:
            yield True
        finally:
            _bf16_copies = None


@contextlib.contextmanager
def forwards_replaced(modules: list[torch.nn.Module], forward_for: Any) -> Iterator[list[torch.nn.Module]]:
    """Within the block, each module's forward is `forward_for(module)`, set on the instance and deleted after (also
    on an error); a module whose instance already has its own forward is left alone. Yields the modules switched."""
    swapped = [module for module in modules if "forward" not in vars(module)]
    for module in swapped:
        module.forward = forward_for(module)
    try:
        yield swapped
    finally:
        for module in swapped:
            del module.forward


@contextlib.contextmanager
def lora_dropout_from_random_bits(model: torch.nn.Module, enabled: bool = True) -> Iterator[bool]:
    """Within the block, the dropout layers of `model`'s LoRA adapters draw each value's keep-or-drop from 16 random
    bits, four values to one 64-bit draw, on CPU. Yields whether any layer was switched.

    SFT keeps LoRA's dropout (DPO turns it off), which masks the input of every adapted layer: 126 layers of the
    embedded model, ~6,000 values a token. torch's `bernoulli_` draws them one at a time on one core, ~5 ns each on
    this machine, about a fifth of an SFT step with bf16 products; a 64-bit draw costs ~1.2 ns. The mask has the same
    distribution up to the keep probability's rounding to 1/65,536, from another stream of the same seeded generator,
    so a run is as reproducible as before but draws other masks than torch's dropout would."""
    if not enabled:
        yield False
        return
    lora_dropouts = [
        module
        for name, module in model.named_modules()
        if type(module) is torch.nn.Dropout and "lora_dropout" in name.split(".")
    ]
    with forwards_replaced(lora_dropouts, _dropout_from_random_bits) as swapped:
        yield bool(swapped)


def _dropout_from_random_bits(module: torch.nn.Dropout) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        if not module.training or module.p == 0 or x.device.type != "cpu" or not x.is_floating_point():
            return torch.nn.functional.dropout(x, module.p, module.training, module.inplace)
        return x.masked_fill(dropped(x.shape, module.p), 0.0).mul_(1.0 / (1.0 - module.p))

    return forward


def dropped(shape: torch.Size, p: float) -> torch.Tensor:
    """A boolean mask of `shape`, each value True with probability p (rounded to 1/65,536), from 16 random bits."""
    threshold = round((1.0 - p) * 65536) - 32768  # an int16 value is dropped at or above it
    if threshold > 2**15 - 1:  # p rounds to 0 (compared as int16, 32,768 would wrap to -32,768)
        return torch.zeros(shape, dtype=torch.bool)
    count = shape.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((count + 3) // 4,), dtype=torch.int64)
    bits = words.view(torch.int16)[:count].view(shape)  # uniform over [-32768, 32767]
    return bits >= threshold


_log_probs_only = False  # set within `log_probs_only`


@contextlib.contextmanager
def log_probs_only() -> Iterator[None]:
    """Within the block, the fused LM head computes the log-probabilities alone, whatever else it was set up to return.

    TRL sets a model's fused head up once with the outputs its training steps log (entropy, mean logits, top-1
    accuracy), and with a PEFT adapter the reference log-probabilities come from the same model, adapter disabled: the
    reference pass then computes those outputs too, and drops them. Each is one or two more passes over every answer
    row's 262,144 logits. (A separate reference model gets a head that returns log-probabilities only.)"""
    global _log_probs_only
    before, _log_probs_only = _log_probs_only, True
    try:
        yield
    finally:
        _log_probs_only = before


class _OnCpu:
    """Stands in for TRL's `ChunkedLogProbFunction` at its one call site: `AnswerLogProbs` for CPU rows that fit,
    TRL's function for everything else (accelerators, soft-capped logits, autocast, more rows than KEPT_BUDGET)."""

    def __init__(self, tiled: Any) -> None:
        self.tiled = tiled

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0,
              outputs=("log_probs",)):  # fmt: skip
        if _log_probs_only:
            outputs = ("log_probs",)
        ours = (
            hidden.device.type == "cpu"
            and softcap is None
            and not torch.is_autocast_enabled("cpu")
            and hidden.shape[0] * weight.shape[0] <= KEPT_BUDGET
        )
        function = AnswerLogProbs if ours else self.tiled
        return function.apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs)


class AnswerLogProbs(torch.autograd.Function):
    """TRL's `ChunkedLogProbFunction` (same arguments, same outputs) for CPU: the vocabulary is projected once, a slice
    of words at a time, and each slice's exponentials are kept for the backward.

    A slice's logits (every row, SLICE_BUDGET values) stay in the cores' caches through the passes over them (max,
    exp, sums), and the LM head's weight is read once per call: blocks of rows over the whole vocabulary read all of
    it (335 MB in bf16 for the embedded model) once per block. The slices' statistics are merged at the end as online
    softmax merges them; the backward scales each kept slice by its own factor, so the softmax is rounded once."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0,
                outputs=("log_probs",)):  # fmt: skip
        ctx.set_materialize_grads(False)
        keep = any(ctx.needs_input_grad[:3])  # grad mode is off inside forward; this says whether backward runs
        scale = logit_scale / temperature
        rows, vocabulary = hidden.shape[0], weight.shape[0]
        low = bf16_copy_for(weight, hidden) if bias is None else None  # the LM head's bf16 copy, if it has one
        multiplicand = weight if low is None else low
        x = hidden.to(multiplicand.dtype)
        # Each target's own logit in fp32, in the normaliser too: where the products round, it would be the error
        target_z = torch.linalg.vecdot(hidden.float(), weight[targets].float())
        if bias is not None:
            target_z += bias[targets].float()
        target_z *= scale
        width = vocabulary_slice(rows, vocabulary)
        kept = torch.empty(rows, vocabulary, dtype=torch.float32 if low is None else torch.bfloat16) if keep else None
        slice_of_target = torch.div(targets, width, rounding_mode="floor")
        columns = ("top", "first", "total", "cross", "squares")
        stats: dict[str, list[torch.Tensor]] = {name: [] for name in columns}
        logit_sums = torch.zeros(rows)
        for number, start in enumerate(range(0, vocabulary, width)):
            end = min(start + width, vocabulary)
            z = x @ multiplicand[start:end].t()  # in the model's dtype, as TRL's tiles are
            if bias is not None:
                z += bias[start:end]
            z = z.float()
            if scale != 1.0:
                z.mul_(scale)
            top, first = z.max(-1)  # the first maximal word, as argmax gives it
            stats["top"].append(top)
            stats["first"].append(first + start)
            if "mean_logits" in outputs:
                logit_sums += z.sum(-1)
            shifted = z.sub_(top.unsqueeze(-1))
            here = (slice_of_target == number).nonzero().squeeze(-1)
            shifted[here, targets[here] - start] = target_z[here] - top[here]
            exp = shifted.exp() if "entropy" in outputs else shifted.exp_()
            stats["total"].append(exp.sum(-1))
            if "log_sum_sq_probs" in outputs:
                stats["squares"].append(torch.linalg.vecdot(exp, exp))
            if keep:
                kept[:, start:end] = exp
            if "entropy" in outputs:
                stats["cross"].append(shifted.mul_(exp).sum(-1))  # sum of exp * shifted: vecdot's sums, in place
            del z, shifted, exp
        tops = torch.stack(stats["top"])  # (slices, rows)
        top = tops.amax(0)
        rescale = torch.exp(tops - top)  # each slice's exponentials, from its own maximum to the row's
        totals = torch.stack(stats["total"])
        total = (rescale * totals).sum(0)
        log_total = total.log()
        log_probs = (target_z - top - log_total).clamp_(max=0.0)
        entropy = log_sum_sq = mean_logits = is_top1 = None
        if "entropy" in outputs:  # -sum p log p = log total - sum exp * (z - top) / total
            cross = rescale * (torch.stack(stats["cross"]) + (tops - top) * totals)
            entropy = log_total - cross.sum(0) / total
        if "log_sum_sq_probs" in outputs:
            log_sum_sq = (rescale.square() * torch.stack(stats["squares"])).sum(0).log() - 2 * log_total
        if "mean_logits" in outputs:
            mean_logits = logit_sums / vocabulary
        if "is_top1" in outputs:  # the first slice holding the row's maximum, and its first maximal word
            holder = (tops == top).to(torch.uint8).argmax(0, keepdim=True)
            is_top1 = torch.stack(stats["first"]).gather(0, holder).squeeze(0) == targets
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.kept, ctx.width, ctx.scale, ctx.low = kept, width, scale, low
        ctx.softmax_factor = rescale / total  # p = kept exponentials x this slice's factor
        ctx.entropy = entropy
        ctx.log_probs = log_probs.detach()  # detached: an output held by its own node would be a reference cycle
        ctx.mark_non_differentiable(*(x for x in (log_sum_sq, mean_logits, is_top1) if x is not None))
        return log_probs, entropy, log_sum_sq, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, *_):  # type: ignore[override]
        if ctx.kept is None:
            raise RuntimeError("AnswerLogProbs keeps its softmax for one backward only")
        hidden, weight, bias, targets = ctx.saved_tensors
        kept, width, factor, low = ctx.kept, ctx.width, ctx.softmax_factor, ctx.low
        ctx.kept = None
        vocabulary = weight.shape[0]
        slices = list(enumerate(range(0, vocabulary, width)))
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32)
        if ctx.needs_input_grad[2]:
            grad_bias = torch.zeros(bias.shape, dtype=torch.float32)
        # Only the hidden states' gradient, through the bf16 product: d log p_target / dz = 1[target] - p is formed
        # in bf16 over the kept exponentials, each slice scaled once by -gradient x its softmax factor. The target's
        # entry, where 1 - p cancels, is formed in fp32 from the log-probability returned, and rounded once.
        only_hidden_in_bf16 = (
            low is not None and ctx.needs_input_grad[0] and grad_weight is None and grad_bias is None
            and grad_logprobs is not None and grad_entropy is None
        )  # fmt: skip
        if only_hidden_in_bf16:
            g = grad_logprobs.float() * ctx.scale
            for number, start in slices:
                kept[:, start : start + width].mul_((-g * factor[number]).to(torch.bfloat16).unsqueeze(-1))
            at_target = -torch.expm1(ctx.log_probs) * g
            # One entry a row, written by index: `scatter_` copied the whole [rows, vocabulary] tensor twice on CPU
            # (~60 ms for 184 rows, 7% of a DPO step), index_put_ writes only the entries (5 us)
            kept.index_put_((torch.arange(len(targets)), targets), at_target.to(torch.bfloat16))
            grad_hidden = (kept @ low).to(hidden.dtype)  # one product over the whole vocabulary, accumulated in fp32
            ctx.log_probs = None
            return grad_hidden, None, None, None, None, None, None, None, None
        if ctx.needs_input_grad[0]:
            grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32)
        multiplicand = weight if low is None else low
        slice_of_target = torch.div(targets, width, rounding_mode="floor")
        for number, start in slices:
            end = min(start + width, vocabulary)
            p = kept[:, start:end].float().mul_(factor[number].unsqueeze(-1))
            grad_z = None
            if grad_entropy is not None:
                # d entropy / dz_j = -p_j (log p_j + entropy); first, because the next term is written over p
                entropy = ctx.entropy.unsqueeze(-1)
                grad_z = (torch.special.xlogy(p, p) + p * entropy).mul_(-grad_entropy.float().unsqueeze(-1))
            if grad_logprobs is not None:
                # d log p_target / dz_j = 1[j = target] - p_j
                g = grad_logprobs.float()
                term = p.mul_(-g.unsqueeze(-1))
                here = (slice_of_target == number).nonzero().squeeze(-1)
                term[here, targets[here] - start] += g[here]
                grad_z = term if grad_z is None else grad_z.add_(term)
            if grad_z is None:
                continue
            grad_z.mul_(ctx.scale)
            if grad_hidden is not None:
                grad_hidden += grad_z.to(multiplicand.dtype) @ multiplicand[start:end]
            if grad_weight is not None:
                grad_weight[start:end] = grad_z.t() @ hidden.float()
            if grad_bias is not None:
                grad_bias[start:end] = grad_z.sum(0)
        ctx.log_probs = None
        grad_hidden = None if grad_hidden is None else grad_hidden.to(hidden.dtype)
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def vocabulary_slice(rows: int, vocabulary: int) -> int:
    """Words projected at once: the widest power of two from MIN_SLICE whose logits for `rows` rows stay within
    SLICE_BUDGET values (measured on 2 cores: 4,096 words for 170 rows, 2,048 for 670 and 1,400)."""
    width = MIN_SLICE
    while width * 2 * max(rows, 1) <= SLICE_BUDGET:
        width *= 2
    return min(width, vocabulary)
