"""What TRL leaves undone on CPU, in one place: the LM head projected only where the loss reads it.

TRL's trainers (SFT and DPO) compute per-token log-probabilities through a fused, tiled LM head
(`trl.trainer.utils.add_fused_lm_head`) that never materialises the (batch, length, vocabulary) logits. On CUDA and
XPU it projects only the positions whose label is not -100 (the answer tokens); on every other device it projects
all positions, prompt and padding included, because a varying number of rows would recompile the kernels of
accelerators such as Neuron. CPU kernels do not recompile, and on the embedded model the LM head is most of the
work: its 262,144 x 640 projection costs ~335 MFLOP a token, the 18 transformer layers ~200 MFLOP. So on CPU the
rows the loss never reads are left out here too; the log-probabilities of the rows it reads are the same numbers
(`tests/training/test_cpu_speed.py` checks this, and `benchmarks/training.py` checks the losses).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def lm_head_on_answer_positions(enabled: bool = True) -> Iterator[bool]:
    """Within the block, TRL's fused LM head projects only labelled positions on CPU as it does on CUDA; yields
    whether it does (False when disabled, or when this TRL has no fused LM head to steer)."""
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:  # pragma: no cover - TRL is a dependency
        yield False
        return
    choose_compact = getattr(trl_utils, "_use_triton", None)
    if not enabled or choose_compact is None:
        if enabled:
            logger.info("this TRL has no fused LM head switch (trl.trainer.utils._use_triton): all positions projected")
        yield False
        return

    # TRL reads this switch only to choose compact rows in the fused LM head; its kernels consult their own copy in
    # trl.kernels.chunked_logprob, so on CPU they keep running the torch tiles.
    def compact_on_cpu_too(device):
        return device.type == "cpu" or choose_compact(device)

    trl_utils._use_triton = compact_on_cpu_too
    try:
        yield True
    finally:
        trl_utils._use_triton = choose_compact
