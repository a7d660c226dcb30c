"""Batched generation and scoring with a transformers model, tuned for throughput.

Why a decoding loop of our own rather than `model.generate`: `generate` keeps computing every row of a batch until
the last one finishes, so one long answer makes 31 finished rows burn compute. Here batching is continuous, as
vLLM's and TGI's: prompts are taken longest first (little padding), finished rows are dropped from the batch and its
KV cache after each step, and once a quarter of the batch is free the next prompts are prefilled together and join
the running rows, their caches left-padded to one width, so that decoding steps stay full. Stop strings end a row as
soon as they appear, and the prefill computes logits only for the last position (the embedded model's 262k-entry
vocabulary makes full-sequence logits the largest cost of a prefill). Sampling uses transformers' own logits
processors, so temperature, top-p and repetition penalty behave exactly as in `generate`.

Which rows share a step depends on when others finish, and bf16 products round differently with the rows beside
them: as `batch_size`, the batching is part of what a run's numbers are (the same prompts and settings give the same
answers on the same machine).
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from selfalign.backends.base import (
    Completion,
    GenerationParams,
    check_score_inputs,
    truncate_at_stop,
)
from selfalign.backends.grouped_attention import attend_with_grouped_heads
from selfalign.backends.language_model import POOLINGS
from selfalign.errors import SelfAlignError
from selfalign.progress import progress_bar

MIN_SHARED_PREFIX = 16  # tokens; below this a shared prefix is not worth its bookkeeping
# New rows join the batch once a quarter of it is free: each join costs a prefill call and a copy of the KV cache,
# so joining one row at a time would cost more than the emptier steps it saves.
REFILL_FRACTION = 4
# Scoring and hidden-state passes take at most this many tokens of the rows' own (rows x the longest row) at once,
# however large batch_size is: past it, their float32 norms and activations outgrow the CPU caches. With the embedded
# model on 2 cores at batch 64, 256 judge prompts (~128 tokens each after the shared prefix) scored 1.29x as fast
# (benchmarks/generation.py --scoring); judging the v2 test sets' answers of three variants took 103 s against 107-109.
PREFILL_TOKENS = 3072
LOGSUMEXP_ELEMENTS = 1 << 20  # float32 logits normalised at once by _summed_log_probs (4 MB)
FIRST_MAX_BLOCK = 2048  # words per block of the greedy choice (_first_max): 2,048 measured fastest of 2k-8k


@dataclass
class SharedPrefix:
    length: int
    cache: Any  # a DynamicCache holding the prefix, batch size 1
    hidden_states: tuple[torch.Tensor, ...] | None = None  # per layer [1, length, hidden], when asked for


@dataclass
class _Cohort:
    """Rows that joined the batch together. They sit next to each other in the batch; where logits processors read
    the rows' tokens, `history` holds them (the prompts left-padded to `prompt_width`, then the generated tokens)."""

    history: torch.Tensor | None
    prompt_width: int
    size: int


class _Decoding:
    """Every prompt's generated tokens, stop-string text and finish reason, as rows of the batch produce them."""

    def __init__(self, prompts: list[list[int]], tokenizer: Any, eos_ids: set[int]) -> None:
        self.prompts, self.tokenizer, self.eos_ids = prompts, tokenizer, eos_ids
        self.generated: list[list[int]] = [[] for _ in prompts]
        self.texts = [""] * len(prompts)
        self.finish = ["length"] * len(prompts)
        self._finished = self._tokens = 0  # since the progress bar last asked

    def goes_on(self, index: int, token: int, params: GenerationParams) -> bool:
        """Record the token prompt `index` chose; whether it decodes on."""
        if token in self.eos_ids:
            self.finish[index] = "stop"
            self._finished += 1
            return False
        self.generated[index].append(token)
        self._tokens += 1
        if params.stop:
            text = self.tokenizer.decode(self.generated[index], skip_special_tokens=True)
            self.texts[index], stopped = truncate_at_stop(text, params.stop)
            if stopped:
                self.finish[index] = "stop"
                self._finished += 1
                return False
        if len(self.generated[index]) >= params.max_new_tokens:
            self._finished += 1
            return False
        return True

    def newly_finished(self) -> int:
        count, self._finished = self._finished, 0
        return count

    def newly_generated(self) -> int:
        count, self._tokens = self._tokens, 0
        return count


@dataclass
class _Batch:
    """The rows decoding together: their KV cache and attention mask (left-padded to a common width), the position
    of each row's last cached token, the token each feeds next, the prompt each answers, and their cohorts in order."""

    cache: Any
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    rows: list[int]
    cohorts: list[_Cohort]
    next_tokens: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        return self.attention_mask.shape[1]

    def can_take(self, window: int | None, joining_width: int, params: GenerationParams) -> bool:
        """Whether rows as wide as `joining_width` can join: only while every row, padding included, stays inside
        the sliding attention window, whose layers drop their oldest positions, so that padding them is not safe."""
        return window is None or max(self.width, joining_width) + params.max_new_tokens < window - 1

    def advanced(self, next_tokens: torch.Tensor, decoding: _Decoding, params: GenerationParams) -> _Batch:
        """Record the chosen tokens, drop the rows that finished, and drop padding no row needs any more."""
        keep = [
            row for row, token in enumerate(next_tokens.tolist()) if decoding.goes_on(self.rows[row], token, params)
        ]
        if not keep:
            self.rows = []
            return self
        if len(keep) < self.size:
            keep_index = torch.tensor(keep, device=self.attention_mask.device)
            _select_cache_rows(self.cache, keep_index)
            self.attention_mask = self.attention_mask.index_select(0, keep_index)
            self.position_ids = self.position_ids.index_select(0, keep_index)
            next_tokens = next_tokens.index_select(0, keep_index)
            kept, start = set(keep), 0
            for cohort in self.cohorts:
                own = [row - start for row in range(start, start + cohort.size) if row in kept]
                start += cohort.size
                if cohort.history is not None and len(own) < cohort.size:
                    cohort.history = cohort.history[torch.tensor(own, dtype=torch.long)]
                cohort.size = len(own)
            self.cohorts = [cohort for cohort in self.cohorts if cohort.size]
            self.rows = [self.rows[row] for row in keep]
        start = 0
        for cohort in self.cohorts:
            if cohort.history is not None:
                cohort.history = torch.cat([cohort.history, next_tokens[start : start + cohort.size, None]], dim=-1)
            start += cohort.size
        self.next_tokens = next_tokens
        unused = int(self.attention_mask.any(dim=0).int().argmax())  # leading columns that are padding in every row
        if unused and _cache_is_whole(self.cache, self.width):
            _trim_cache_left(self.cache, unused)
            self.attention_mask = self.attention_mask[:, unused:]
        return self

    def merged_with(self, other: _Batch) -> _Batch:
        """This batch with `other`'s rows after its own, both left-padded to the wider one's width."""
        if not other.size:
            return self
        width = max(self.width, other.width)
        for batch in (self, other):
            if batch.width < width:
                _pad_cache_left(batch.cache, width - batch.width)
                padding = batch.attention_mask.new_zeros((batch.size, width - batch.width))
                batch.attention_mask = torch.cat([padding, batch.attention_mask], dim=-1)
        _concatenate_caches(self.cache, other.cache)
        self.attention_mask = torch.cat([self.attention_mask, other.attention_mask])
        self.position_ids = torch.cat([self.position_ids, other.position_ids])
        self.next_tokens = torch.cat([self.next_tokens, other.next_tokens])
        self.rows += other.rows
        self.cohorts += other.cohorts
        return self


class TransformersBackend:
    name = "transformers"

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 32, show_progress: bool = True) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = _eos_token_ids(model, tokenizer)
        self.cache_argument = _cache_argument_name(model)
        _feed_output_projection_contiguous_rows(model)
        _prepack_output_projection(model, batch_size)
        attend_with_grouped_heads(model)

    def merge_adapter(self) -> None:
        """Fold the PEFT adapter into the weights (PEFT's `merge_and_unload`), for a model that only answers and scores.

        Unmerged, each of the adapted layers (126 in the embedded model) adds a cast to float32, two small products and
        an add to every forward pass: merged, the demo's adapters generate 1.3x as fast on 2 CPU cores
        (`benchmarks/generation.py --merge`). The merged weights are the adapted model's own rounded to bf16, as the
        base model's are, but not the same numbers as bf16 base weights plus a float32 LoRA: some greedy answers
        differ (BENCHMARKS.md). A 4-bit model keeps its adapter apart: merging would quantise the sum again. Not for
        a model that a judge adapter may be attached to (`judge_adapter_enabled` switches the policy's adapter off),
        nor one that trains.
        """
        from peft import PeftModel

        if isinstance(self.model, PeftModel) and getattr(self.model.get_base_model(), "hf_quantizer", None) is None:
            self.model = self.model.merge_and_unload()

    # ---- generation -------------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str], params: GenerationParams) -> list[Completion]:
        """Continuous batching: up to `batch_size` rows decode together, and as rows finish, the next prompts (longest
        first) are prefilled and join the running batch, so that decoding steps stay full (module docstring)."""
        encoded = [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
        longest_first = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # memory peaks early
        pending = deque(longest_first)
        decoding = _Decoding(encoded, self.tokenizer, self.eos_ids)
        generator = torch.Generator(device="cpu").manual_seed(params.seed)
        processors = _logits_processors(params)
        prefix = self._shared_prefix(encoded)
        window = _sliding_window(self.model.config)
        with progress_bar("generating", total=len(prompts), enabled=self.show_progress, unit="tok") as bar:
            batch: _Batch | None = None
            while pending or batch is not None:
                if pending and self._takes_more(batch, len(encoded[pending[0]]), window, params):
                    free = self.batch_size - (batch.size if batch else 0)
                    joining = [pending.popleft() for _ in range(min(free, len(pending)))]
                    cohort = self._start_cohort(joining, decoding, params, processors, generator, prefix)
                    batch = cohort if batch is None else batch.merged_with(cohort)
                else:
                    batch = self._decode_step(batch, decoding, params, processors, generator)
                bar.advance(decoding.newly_finished(), tokens=decoding.newly_generated())
                if batch is not None and not batch.size:
                    batch = None
        return [
            self._completion(encoded[i], decoding.generated[i], decoding.texts[i], decoding.finish[i], params)
            for i in range(len(prompts))
        ]

    def _takes_more(
        self, batch: _Batch | None, joining_width: int, window: int | None, params: GenerationParams
    ) -> bool:
        if batch is None:
            return True
        free = self.batch_size - batch.size
        return free >= max(1, self.batch_size // REFILL_FRACTION) and batch.can_take(window, joining_width, params)

    @torch.inference_mode()
    def _start_cohort(
        self, joining: list[int], decoding: _Decoding, params: GenerationParams, processors: Any,
        generator: torch.Generator, prefix: SharedPrefix | None,
    ) -> _Batch:  # fmt: skip
        """Prefill prompts that join the batch together (a cohort) and choose their first tokens."""
        prompt_ids = [decoding.prompts[i] for i in joining]
        logits, cache, attention_mask, position_ids = self._prefill(prompt_ids, prefix, logits_to_keep=1)
        # prompt + generated tokens of the active rows, which the repetition penalty looks at (the n-gram ban looks at
        # the generated part only: an answer may repeat what its prompt said, e.g. a forced refusal prefix)
        history = self._left_pad(prompt_ids)[0] if processors or params.no_repeat_ngram_size else None
        cohort = _Cohort(history, history.shape[1] if history is not None else 0, len(joining))
        batch = _Batch(cache, attention_mask, position_ids[:, -1:], joining, [cohort])
        next_tokens = self._choose_tokens(history, cohort.prompt_width, logits[:, -1, :], params, processors, generator)
        return batch.advanced(next_tokens, decoding, params)

    @torch.inference_mode()
    def _decode_step(
        self, batch: _Batch, decoding: _Decoding, params: GenerationParams, processors: Any,
        generator: torch.Generator,
    ) -> _Batch:  # fmt: skip
        """Feed every row the token it chose last, and choose the next, cohort by cohort (logits processors read the
        rows' histories, which are laid out per cohort)."""
        attention_mask = torch.cat([batch.attention_mask, batch.attention_mask.new_ones((batch.size, 1))], dim=-1)
        position_ids = batch.position_ids + 1
        logits = self.model(
            input_ids=batch.next_tokens.unsqueeze(-1),
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_argument: batch.cache},
        ).logits[:, -1, :]
        batch.attention_mask, batch.position_ids = attention_mask, position_ids
        chosen, start = [], 0
        for cohort in batch.cohorts:
            rows = slice(start, start + cohort.size)
            chosen.append(self._choose_tokens(cohort.history, cohort.prompt_width, logits[rows], params, processors,
                                              generator))  # fmt: skip
            start += cohort.size
        return batch.advanced(torch.cat(chosen), decoding, params)

    def _choose_tokens(
        self, history: torch.Tensor, prompt_width: int, logits: torch.Tensor, params: GenerationParams,
        processors: Any, generator,
    ) -> torch.Tensor:  # fmt: skip
        if params.temperature == 0 and not processors and not params.no_repeat_ngram_size:
            return _first_max(logits)  # the token float32 scores would give, without copying 262k logits a row
        scores = logits.float()
        if params.no_repeat_ngram_size:
            from transformers import NoRepeatNGramLogitsProcessor

            scores = NoRepeatNGramLogitsProcessor(params.no_repeat_ngram_size)(history[:, prompt_width:], scores)
        if processors:
            scores = processors(history, scores)
        if params.temperature == 0:
            return _first_max(scores)
        probabilities = torch.softmax(scores, dim=-1)
        return torch.multinomial(probabilities.cpu(), 1, generator=generator).squeeze(-1).to(self.device)

    def _completion(
        self, prompt: list[int], tokens: list[int], text: str, finish: str, params: GenerationParams
    ) -> Completion:
        if not params.stop:
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        elif finish == "stop" and text:
            # Count tokens up to the stop string only: the tokens that spelled it are not part of the answer.
            kept = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            tokens = tokens[: min(kept, len(tokens))]
        return Completion(
            text=text.strip(), prompt_tokens=len(prompt), completion_tokens=len(tokens), finish_reason=finish
        )

    # ---- scoring ----------------------------------------------------------------------------------------------

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        """log P(continuation | prompt), summed over the continuation's tokens.

        Pairs that share a prompt and a single-token continuation (a judge asking P(" 1") and P(" 0")) share one
        forward pass: each unit below is one input sequence, with every continuation read off its last logits.
        """
        check_score_inputs(prompts, continuations)
        units: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for index, (prompt, continuation) in enumerate(zip(prompts, continuations)):
            prompt_ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            target = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            units.setdefault(tuple(prompt_ids + target[:-1]), []).append((index, target))
        keys = sorted(units, key=len, reverse=True)
        prefix = self._shared_prefix([list(key) for key in keys])
        scores = [0.0] * len(prompts)
        with progress_bar("scoring", total=len(keys), enabled=self.show_progress, unit="seq") as bar:
            for rows in self._prefill_batches([len(key) for key in keys], prefix):
                batch = keys[rows]
                for key, log_probs in zip(batch, self._score_batch(batch, [units[k] for k in batch], prefix)):
                    for (index, _), value in zip(units[key], log_probs):
                        scores[index] = value
                bar.advance(len(batch))
        return scores

    @torch.inference_mode()
    def _score_batch(
        self,
        inputs: list[tuple[int, ...]],
        targets: list[list[tuple[int, list[int]]]],
        prefix: SharedPrefix | None = None,
    ) -> list[list[float]]:
        longest = max(len(target) for unit in targets for _, target in unit)
        logits, _, _, _ = self._prefill([list(ids) for ids in inputs], prefix, logits_to_keep=longest)
        return _summed_log_probs(logits, [[target for _, target in unit] for unit in targets])

    # ---- hidden states ----------------------------------------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        return self.model.config.get_text_config().hidden_size

    @property
    def hidden_state_count(self) -> int:
        """Entries of `output_hidden_states`: the embeddings (0), then one per layer (the last after the final norm)."""
        return self.model.config.get_text_config().num_hidden_layers + 1

    def hidden_states(
        self, prompts: Sequence[str], spans: Sequence[tuple[int, int] | None], layers: Sequence[int] | None = None,
        continuations: Sequence[str] = (),
    ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:  # fmt: skip
        """Pooled hidden states of each prompt: {pooling: float32 array [prompt, layer, hidden]}, in input order; and,
        read off the same pass's last logits, log P(continuation | prompt) for each of `continuations`, [prompt,
        continuation] (what `score` gives them), or None where they differ in more than their last token. Their
        shared tokens before that one (Gemma's "▁" of " 1" and " 0") are read too, after the poolings' positions.

        Poolings, all read from one forward pass: `last` (the last token, where the next-token prediction is read),
        `answer` (mean over the tokens overlapping the character span `spans[i]`, e.g. the answer a judge reads; the
        last token where the span is None or covers none), `prompt` (mean over every token but special ones).
        Batched, length-sorted and from the shared prefix's cache like `score`, so it costs what scoring costs.
        `layers` index the `output_hidden_states` entries (default: all of them).
        """
        if len(spans) != len(prompts):
            raise SelfAlignError(f"hidden_states: {len(prompts)} prompts but {len(spans)} spans")
        count = self.hidden_state_count
        chosen = list(range(count)) if layers is None else list(layers)
        if any(not 0 <= layer < count for layer in chosen):
            raise SelfAlignError(f"hidden_states: layers {chosen} out of range; this model has 0 to {count - 1}")
        if not self.tokenizer.is_fast:
            raise SelfAlignError("hidden_states: needs a fast tokenizer (character offsets of tokens)")
        encoded = [
            self.tokenizer(p, add_special_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True)
            for p in prompts
        ]
        ids = [e["input_ids"] for e in encoded]
        targets = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
        head = targets[0][:-1] if targets else []  # " 1" is "▁", "1" for Gemma: the pass reads on over "▁"
        scored = bool(targets) and all(t and t[:-1] == head for t in targets)
        if scored:
            ids = [sequence + head for sequence in ids]  # as `score` lays out its units; poolings stop before
        order = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))
        prefix = self._shared_prefix([ids[i] for i in order], with_hidden_states=True)
        pooled = {name: np.zeros((len(prompts), len(chosen), self.hidden_size), np.float32) for name in POOLINGS}
        log_probs = np.zeros((len(prompts), len(targets))) if scored else None
        with progress_bar("reading hidden states", total=len(prompts), enabled=self.show_progress, unit="seq") as bar:
            for rows in self._prefill_batches([len(ids[i]) for i in order], prefix):
                batch = order[rows]
                states, batch_log_probs = self._hidden_batch([ids[i] for i in batch], prefix, chosen,
                                                             targets if scored else None)  # fmt: skip
                for row, index in enumerate(batch):
                    for name, positions in _pooling_positions(encoded[index], spans[index]).items():
                        pooled[name][index] = states[row][:, positions, :].mean(dim=1).numpy()
                    if log_probs is not None:
                        log_probs[index] = batch_log_probs[row]
                bar.advance(len(batch))
        return pooled, log_probs

    @torch.inference_mode()
    def _hidden_batch(
        self, sequences: list[list[int]], prefix: SharedPrefix | None, layers: list[int],
        targets: list[list[int]] | None = None,
    ) -> tuple[list[torch.Tensor], list[list[float]] | None]:  # fmt: skip
        """Per sequence, float32 [layer, token, hidden] over all its tokens (the shared prefix's included); and, for
        `targets` that the sequences end with all but the last token of, their summed log-probabilities after each
        sequence, [sequence][target], as `_score_batch` computes them (with the same prefill)."""
        input_ids, full_mask, position_ids, cache = self._prefill_inputs(sequences, prefix)
        output = self.model(
            input_ids=input_ids, attention_mask=full_mask, position_ids=position_ids, use_cache=prefix is not None,
            logits_to_keep=len(targets[0]) if targets else 1, output_hidden_states=True,
            **({self.cache_argument: cache} if prefix else {}),
        )  # fmt: skip
        log_probs = _summed_log_probs(output.logits, [targets] * len(sequences)) if targets else None
        shared = prefix.length if prefix else 0
        rows = []
        for row, sequence in enumerate(sequences):
            own = len(sequence) - shared  # the row's own tokens sit at the right end of the left-padded batch
            per_layer = []
            for layer in layers:
                states = output.hidden_states[layer][row, input_ids.shape[1] - own :]
                if prefix is not None:
                    states = torch.cat([prefix.hidden_states[layer][0], states])
                per_layer.append(states.float().cpu())  # pool in float32, whatever the model's dtype
            rows.append(torch.stack(per_layer))
        return rows, log_probs

    def _prefill_batches(self, lengths: list[int], prefix: SharedPrefix | None) -> Iterator[slice]:
        """Consecutive batches of sequences sorted longest first: at most `batch_size` rows, and at most
        PREFILL_TOKENS tokens after the shared prefix (rows x the first, longest row) unless one row is longer."""
        shared = prefix.length if prefix else 0
        start = 0
        while start < len(lengths):
            rows = max(1, min(self.batch_size, PREFILL_TOKENS // max(1, lengths[start] - shared)))
            yield slice(start, start + rows)
            start += rows

    # ---- shared prompt prefixes ---------------------------------------------------------------------------------

    def _shared_prefix(self, sequences: list[list[int]], with_hidden_states: bool = False) -> SharedPrefix | None:
        """The KV cache of the token prefix that every sequence of a call shares, computed once.

        Judge prompts repeat the same instructions and examples for every item: computing them once and only the
        item's own tokens per row cuts a judge's forward work several times. Rows are laid out as
        [shared prefix][padding][own tokens], with position ids that skip the padding. Used only where every
        sequence fits in the model's sliding attention window, so that the padding cannot narrow the window.
        """
        if len(sequences) < 2:
            return None
        length = min(len(s) for s in sequences) - 1  # every row keeps at least one token of its own
        first = sequences[0]
        for sequence in sequences[1:]:
            length = next((i for i in range(length) if sequence[i] != first[i]), length)
        window = _sliding_window(self.model.config)
        if length < MIN_SHARED_PREFIX or (window and max(len(s) for s in sequences) >= window):
            return None
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            output = self.model(input_ids=torch.tensor([first[:length]], device=self.device), use_cache=True,
                                logits_to_keep=1, output_hidden_states=with_hidden_states,
                                **{self.cache_argument: cache})  # fmt: skip
        return SharedPrefix(length, cache, output.hidden_states if with_hidden_states else None)

    def _prefill(
        self, sequences: list[list[int]], prefix: SharedPrefix | None, logits_to_keep: int
    ) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
        """Forward left-padded sequences, from the shared prefix's cache when there is one.

        Returns the last `logits_to_keep` logits, the cache, and the attention mask and position ids of the whole
        sequences (prefix included), ready for decoding to continue.
        """
        input_ids, full_mask, position_ids, cache = self._prefill_inputs(sequences, prefix)
        logits = self.model(
            input_ids=input_ids,
            attention_mask=full_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **{self.cache_argument: cache},
        ).logits
        return logits, cache, full_mask, position_ids

    def _prefill_inputs(
        self, sequences: list[list[int]], prefix: SharedPrefix | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        """Left-padded input ids (after the prefix), the full attention mask, position ids, and a cache to fill."""
        from transformers import DynamicCache

        if prefix is None:
            input_ids, attention_mask = self._left_pad(sequences)
            cache = DynamicCache(config=self.model.config)
            full_mask = attention_mask
        else:
            input_ids, attention_mask = self._left_pad([s[prefix.length :] for s in sequences])
            cache = copy.deepcopy(prefix.cache)
            cache.batch_repeat_interleave(len(sequences))
            full_mask = torch.cat([attention_mask.new_ones((len(sequences), prefix.length)), attention_mask], dim=-1)
        position_ids = (full_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
        return input_ids, full_mask, position_ids, cache

    # ---- helpers ----------------------------------------------------------------------------------------------

    def _left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            if sequence:
                ids[row, width - len(sequence) :] = torch.tensor(sequence)
                mask[row, width - len(sequence) :] = 1
        return ids.to(self.device), mask.to(self.device)


def _sliding_window(config: Any) -> int | None:
    text_config = getattr(config, "text_config", None)
    return getattr(config, "sliding_window", None) or getattr(text_config, "sliding_window", None)


def _cache_layers(cache: Any) -> list[Any]:
    """The cache's layers that hold keys and values (a layer that shares another's holds none)."""
    return [layer for layer in cache.layers if getattr(layer, "is_initialized", False) and layer.keys.numel()]


def _set_keys_and_values(layer: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
    layer.keys, layer.values = keys, values
    if hasattr(layer, "cumulative_length"):  # a sliding-window layer counts the positions it has seen
        layer.cumulative_length = keys.shape[-2]


def _cache_is_whole(cache: Any, width: int) -> bool:
    """Whether every layer still holds all `width` positions (a sliding-window layer drops the oldest ones)."""
    return all(layer.keys.shape[-2] == width for layer in _cache_layers(cache))


def _select_cache_rows(cache: Any, rows: torch.Tensor) -> None:
    """Keep only `rows` of every layer's keys and values. `index_select` where the cache's own `batch_select_indices`
    indexes (`keys[rows]`): the same rows, copied 3x as fast on CPU (0.27 against 0.83 ms a layer at 128 rows)."""
    for layer in _cache_layers(cache):  # the positions are the same: a sliding layer's count of them stays
        layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)


def _trim_cache_left(cache: Any, count: int) -> None:
    for layer in _cache_layers(cache):
        _set_keys_and_values(layer, layer.keys[:, :, count:], layer.values[:, :, count:])


def _pad_cache_left(cache: Any, count: int) -> None:
    for layer in _cache_layers(cache):
        keys, values = layer.keys, layer.values
        padding = keys.new_zeros((*keys.shape[:2], count, keys.shape[3]))
        _set_keys_and_values(layer, torch.cat([padding, keys], dim=-2), torch.cat([padding, values], dim=-2))


def _concatenate_caches(cache: Any, other: Any) -> None:
    """`other`'s rows appended to `cache`'s (both as wide)."""
    for layer, joining in zip(_cache_layers(cache), _cache_layers(other), strict=True):
        _set_keys_and_values(layer, torch.cat([layer.keys, joining.keys]), torch.cat([layer.values, joining.values]))


def _first_max(scores: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (its first maximum, as `argmax`), found block by block: the maximum of each block of
    FIRST_MAX_BLOCK words (`amax`, which vectorises where the index-tracking reductions do not), then the first
    maximum inside the first block that holds the row's maximum. On CPU over a 262k-word vocabulary, bf16 at 128
    rows: 4.2 ms against 17.9 for `max(dim).indices` and 56 for `argmax`, the same index (ties included; tests)."""
    rows, vocab = scores.shape
    blocks = vocab // FIRST_MAX_BLOCK
    if blocks < 2:
        return scores.max(dim=-1).indices
    head = scores[:, : blocks * FIRST_MAX_BLOCK].view(rows, blocks, FIRST_MAX_BLOCK)
    block_max = head.amax(dim=-1)  # [rows, blocks]
    best = block_max.max(dim=-1)  # the first block holding each row's maximum
    inside = head[torch.arange(rows, device=scores.device), best.indices].max(dim=-1).indices
    chosen = best.indices * FIRST_MAX_BLOCK + inside
    if vocab > blocks * FIRST_MAX_BLOCK:  # the words after the last whole block win only when strictly larger
        tail = scores[:, blocks * FIRST_MAX_BLOCK :].max(dim=-1)
        chosen = torch.where(tail.values > best.values, tail.indices + blocks * FIRST_MAX_BLOCK, chosen)
    return chosen


def _summed_log_probs(logits: torch.Tensor, targets: list[list[list[int]]]) -> list[list[float]]:
    """Per row, the summed log-probability of each of its targets (token ids), read off the row's last logits: a
    target of k tokens takes the last k positions. A log-probability is the logit less its position's logsumexp,
    computed a few positions at a time in float32, so that the temporaries stay small and in cache: never a whole
    log_softmax over the vocabulary (judge prompts at 128 rows x 2 positions x 262k words: 35 ms against 134), and
    nearer float64's values than a float32 log_softmax is (within 3e-6 against 5e-5 on random 262k-word rows)."""
    rows, longest, vocab = logits.shape
    flat = logits.reshape(rows * longest, vocab)
    step = max(1, LOGSUMEXP_ELEMENTS // vocab)
    normalizers = torch.cat(
        [torch.logsumexp(flat[start : start + step].float(), dim=-1) for start in range(0, len(flat), step)]
    ).view(rows, longest)
    results = []
    for row, row_targets in enumerate(targets):
        row_values = []
        for target in row_targets:
            start = longest - len(target)
            chosen = logits[row, start:].gather(-1, torch.tensor(target, device=logits.device).unsqueeze(-1)).float()
            row_values.append(float((chosen.squeeze(-1) - normalizers[row, start:]).sum()))
        results.append(row_values)
    return results


def _pooling_positions(encoding: Any, span: tuple[int, int] | None) -> dict[str, list[int]]:
    """Token positions each pooling averages over, from the tokenizer's character offsets."""
    last = [len(encoding["input_ids"]) - 1]
    plain = [i for i, special in enumerate(encoding["special_tokens_mask"]) if not special]
    answer = []
    if span is not None:
        offsets, (start, end) = encoding["offset_mapping"], span
        answer = [i for i in plain if offsets[i][0] < end and offsets[i][1] > start]
    return {"last": last, "answer": answer or last, "prompt": plain or last}


def _cache_argument_name(model: Any) -> str:
    """transformers 5.x renamed `past_key_values` to `cache` in model forwards; support both spellings."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


CONTIGUOUS_ROWS_HOOK = "_selfalign_contiguous_rows_hook"


def _feed_output_projection_contiguous_rows(model: Any) -> None:
    """Hand the output projection a contiguous copy of the positions transformers keeps for logits.

    Transformers slices `hidden_states[:, -k:, :]` before the output projection. For that non-contiguous 3-D input
    `torch.matmul` folds the batch into one `mm` only when the weight requires grad; with a frozen weight, as under
    every PEFT adapter, it expands the weight once per row and copies it for a `bmm`. With Gemma 3's 262k-token
    vocabulary that is a rows x 640 x 262144 copy at every prefill (5.4 GB in bf16 for 16 rows), which made adapters
    generate 6-7x slower (`benchmarks/generation.py --adapter`). The contiguous copy of the kept rows is a few kB.
    """
    projection = model.get_output_embeddings()
    if projection is None or hasattr(projection, CONTIGUOUS_ROWS_HOOK):
        return
    hook = projection.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))
    setattr(projection, CONTIGUOUS_ROWS_HOOK, hook)  # the handle: benchmarks/generation.py --adapter removes it


PREPACKED = "_selfalign_prepacked_weight"


def _prepack_output_projection(model: Any, batch_size: int) -> None:
    """On a CPU with bf16 units, compute the output projection from a copy of its weight laid out once for oneDNN.

    A plain bf16 `linear` has oneDNN reorder the weight into its blocked layout at every call: for Gemma 3's
    262k x 640 projection, a 335 MB copy per decoding step. The prepacked copy (`mkldnn._reorder_linear_weight`,
    which torch.compile's CPU freezing pass uses for the same reason) costs 335 MB more memory and makes generation
    1.12x as fast at batch 64 with the same answers (`benchmarks/generation.py --prepacked`): at the row counts of
    decoding steps (1 to 160) its logits are `F.linear`'s bit for bit; at more rows, as a scoring pass may have,
    `F.linear` itself changes kernels and the two can differ in the last bit (BENCHMARKS.md). The copy is of the
    weight as loaded: the backend never trains.
    """
    projection = model.get_output_embeddings()
    weight = getattr(projection, "weight", None)
    usable = (
        isinstance(projection, torch.nn.Linear) and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
        and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )  # fmt: skip
    if not usable or hasattr(projection, PREPACKED):
        return
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_size)
    setattr(projection, PREPACKED, packed)
    bias = projection.bias

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and hidden.requires_grad:  # oneDNN's op has no backward pass
            return torch.nn.functional.linear(hidden, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(hidden, packed, bias, "none", [], "")

    projection.forward = forward


def _logits_processors(params: GenerationParams) -> Any:
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.temperature > 0:
        processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
    return processors


def create_transformers_backend(config: Any) -> TransformersBackend:
    """`backend: transformers`: load the model (and a PEFT adapter, unmerged, if the config names one)."""
    from selfalign.models.loading import load_model

    if config.options:
        raise SelfAlignError(f"transformers backend takes no options, got {sorted(config.options)}")
    loaded = load_model(config.model, dtype=config.dtype, load_in_4bit=config.load_in_4bit)
    network = loaded.model
    if config.adapter:
        from peft import PeftModel

        network = PeftModel.from_pretrained(network, config.adapter).eval()
    return TransformersBackend(network, loaded.tokenizer, batch_size=config.batch_size)
