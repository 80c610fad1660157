"""The engine core: schedule -> prefill/decode -> sample, one step at a time, token ids only.

It knows no asyncio, no text and no transport: commands come in through
`apply()`, and each `step()` returns ONE StepOutput for every row it touched.
The same core runs on a thread of the server process (engine.py, the library
and the benchmark's baseline) or in a process of its own (core_process.py).

Every ending of a request is decided here, in `_end()`: its own token (a stop
token, EOS, the length limit), an abort (a cancel, a deadline, a stop string the
frontend found, the drain), or a failed step. A sequence's text is the
frontend's business.
"""

from __future__ import annotations

import logging
import time

import torch
from transformers import PreTrainedModel

from modelserve.config import AUTO_PREFILL_CHUNK_CPU, AUTO_PREFILL_CHUNK_CUDA, DEFAULT_CPU_KV_BYTES
from modelserve.engine.kv_cache import KVPool
from modelserve.engine.prefix_cache import PrefixCache, prefix_budget_tokens
from modelserve.engine.protocol import Abort, AbortAll, AddRequest, Command, RowOutput, StepOutput
from modelserve.engine.request import EngineStats, FinishReason, Request, StepRecord
from modelserve.engine.runner import ModelRunner
from modelserve.engine.sampler import SampleResult, SamplingRow, sample
from modelserve.engine.scheduler import Scheduler
from modelserve.engine.sequence import Sequence

log = logging.getLogger(__name__)

MIN_PREFILL_CHUNK_AFTER_OOM = 16


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError)


class EngineCore:
    """Continuous batching over one model, driven one step at a time."""

    def __init__(
        self,
        model: PreTrainedModel,
        eos_token_ids: tuple[int, ...],
        max_batch_size: int,
        prefill_chunk_tokens: int,
        kv_cache_bytes: int,
        gpu_memory_fraction: float,
        max_sequence_length: int,
        observed: bool = False,
        cuda_graphs: bool = False,
        prefix_caching: bool = True,
    ) -> None:
        self.runner = ModelRunner(model, cuda_graphs)
        self._eos_ids = frozenset(eos_token_ids)
        shape = self.runner.kv_shape
        budget_tokens = self._kv_budget_bytes(kv_cache_bytes, gpu_memory_fraction) // shape.bytes_per_token
        prefix_tokens = prefix_budget_tokens(budget_tokens, max_sequence_length) if prefix_caching else 0
        self.prefix = PrefixCache(shape, prefix_tokens) if prefix_tokens else None
        self.pool = KVPool(shape, budget_tokens - prefix_tokens, max_batch_size, max_sequence_length)
        self.max_sequence_tokens = self.pool.max_columns
        """The longest sequence (prompt + max_new_tokens) that can ever run: context and KV budget."""
        chunk = prefill_chunk_tokens or (
            AUTO_PREFILL_CHUNK_CUDA if self.runner.device.type == "cuda" else AUTO_PREFILL_CHUNK_CPU
        )
        self.scheduler = Scheduler(max_batch_size, chunk)
        # Telemetry watches this core: it reads each response's mean log-probability (a logsumexp over the
        # vocabulary per row and step) and each phase's own time (a device sync), so only then are they paid.
        self._observed = observed
        self._live: dict[int, Sequence] = {}
        self._step = 0
        log.info(
            "KV pool: budget %d tokens (%.2f GiB at %d bytes/token), up to %d rows",
            self.pool.budget_tokens,
            self.pool.budget_tokens * shape.bytes_per_token / 2**30,
            shape.bytes_per_token,
            max_batch_size,
        )
        if self.prefix is not None:
            log.info(
                "prefix cache: %d tokens (%.2f GiB) of the KV budget",
                prefix_tokens,
                prefix_tokens * shape.bytes_per_token / 2**30,
            )
        elif prefix_caching:
            log.info(
                "prefix cache: off (a KV budget of %d tokens leaves no room beside one %d-token sequence)",
                budget_tokens,
                max_sequence_length,
            )

    def _kv_budget_bytes(self, kv_cache_bytes: int, gpu_memory_fraction: float) -> int:
        if kv_cache_bytes:
            return kv_cache_bytes
        device = self.runner.device
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free * gpu_memory_fraction)
        return DEFAULT_CPU_KV_BYTES

    # ---- commands ---------------------------------------------------------------------------------------

    def apply(self, command: Command) -> None:
        """A request joins the waiting queue, or an abort marks what it names (acted on at the next step)."""
        if isinstance(command, AddRequest):
            seq = Sequence(command.key, command.request, _generator(command.request))
            self._live[seq.key] = seq
            self.scheduler.add(seq)
        elif isinstance(command, Abort):
            target = self._live.get(command.key)
            if target is not None:
                _mark_aborted(target, command.reason, command.error)
        elif isinstance(command, AbortAll):
            for live in self._live.values():
                _mark_aborted(live, command.reason, command.error)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- one step ---------------------------------------------------------------------------------------

    def step(self) -> StepOutput:
        out: list[RowOutput] = []
        scheduler, pool = self.scheduler, self.pool
        step_started = time.perf_counter()
        scheduler.expire(time.monotonic())
        for seq in scheduler.take_aborted():  # waiting ones are dropped without touching the model
            out.append(self._end(seq, seq.abort_reason or FinishReason.CANCELLED, seq.abort_error))
        for seq in scheduler.running:
            if seq.abort_reason is not None and seq.finish is None:
                out.append(self._end(seq, seq.abort_reason, seq.abort_error))
        scheduler.retire_finished(pool)
        admitted = [seq.key for seq in scheduler.admit(pool)]
        if self.prefix is not None:
            self._restore_prefixes(self.prefix)

        prefill_started, prefilled = time.perf_counter(), 0
        completed: list[tuple[Sequence, torch.Tensor]] = []  # prompts done this step, with their last logits
        for seq, n_tokens in scheduler.prefill_plan():
            prefilled += n_tokens
            try:
                logits = self._prefill(seq, n_tokens)
            except Exception as exc:  # this prompt failed; the running rows are untouched
                scheduler.drop_prefill(seq)
                out.append(self._end(seq, *self._step_failed("prefill", exc, n_tokens)))
                continue
            if logits is not None:
                completed.append((seq, logits))
        if prefilled and self._observed:
            self.runner.synchronize()  # so the prefill's time is its own in the step metrics
        prefill_s = time.perf_counter() - prefill_started

        decode_started, running = time.perf_counter(), list(scheduler.running)
        if running:
            try:
                decode_logits = self.runner.decode(pool)
            except Exception as exc:  # a failed step fails the requests it touched, not the engine
                reason, error = self._step_failed("decode", exc, len(running))
                out.extend(self._end(seq, reason, error) for seq in scheduler.drop_running(pool))
                running = []
        sampled_rows = [*running, *(seq for seq, _ in completed)]
        if sampled_rows:
            parts = ([decode_logits] if running else []) + [logits[None, :] for _, logits in completed]
            try:
                result = self._sample(torch.cat(parts) if len(parts) > 1 else parts[0], sampled_rows)
            except Exception as exc:
                reason, error = self._step_failed("sampling", exc, len(sampled_rows))
                out.extend(self._end(seq, reason, error) for seq in scheduler.drop_running(pool))
                for seq, _ in completed:
                    scheduler.drop_prefill(seq)
                    out.append(self._end(seq, reason, error))
            else:
                if running:
                    pool.end_decode(result.tokens[: len(running)])
                out.extend(self._append(seq, result, i) for i, seq in enumerate(sampled_rows))
                for j, (seq, _) in enumerate(completed):
                    if seq.finish is None:
                        scheduler.start_decoding(seq, pool, result.tokens[len(running) + j])
                    else:
                        scheduler.drop_prefill(seq)
        decode_s = time.perf_counter() - decode_started if sampled_rows else 0.0
        scheduler.retire_finished(pool)

        for row in out:
            if row.finish is not None:
                self._live.pop(row.key, None)
        self._step += 1
        record = None
        if prefilled or running:
            record = StepRecord(len(running), prefilled, prefill_s, decode_s, time.perf_counter() - step_started)
        return StepOutput(self._step, out, admitted, self.stats(), record)

    def end_all(self, reason: FinishReason, error: str) -> StepOutput:
        """The loop is ending: close every request it holds."""
        out = [self._end(seq, reason, error) for seq in self.scheduler.drop_all(self.pool) if seq.finish is None]
        self._live.clear()
        self._step += 1
        return StepOutput(self._step, out, [], self.stats(), None)

    def stats(self) -> EngineStats:
        scheduler, pool = self.scheduler, self.pool
        gpu_allocated = gpu_reserved = 0
        if self.runner.device.type == "cuda":
            gpu_allocated = torch.cuda.memory_allocated(self.runner.device)
            gpu_reserved = torch.cuda.memory_reserved(self.runner.device)
        return EngineStats(
            running=len(scheduler.running),
            waiting=len(scheduler.waiting) + len(scheduler.prefilling),
            prefilling=len(scheduler.prefilling),
            kv_budget_tokens=pool.budget_tokens,
            kv_tokens_used=pool.tokens_held(),
            prefix_cache_budget_tokens=self.prefix.budget_tokens if self.prefix else 0,
            prefix_cache_tokens=self.prefix.tokens_held() if self.prefix else 0,
            prefix_cache_hit_tokens=self.prefix.hit_tokens if self.prefix else 0,
            max_batch_size=scheduler.max_batch_size,
            gpu_allocated_bytes=gpu_allocated,
            gpu_reserved_bytes=gpu_reserved,
        )

    # ---- pieces -----------------------------------------------------------------------------------------

    def _prefill(self, seq: Sequence, n_tokens: int) -> torch.Tensor | None:
        """Prefill the next chunk; the logits after the prompt's last token once it is all in, else None."""
        buffer = seq.prefill
        assert buffer is not None
        prompt = seq.request.prompt_ids
        logits = self.runner.prefill_chunk(buffer, list(prompt[buffer.past : buffer.past + n_tokens]))
        if buffer.past < len(prompt):
            return None
        if self.prefix is not None:
            try:
                self.prefix.insert(prompt, buffer)
            except Exception:  # the cache misses this prompt; the request itself is fine
                log.exception("prefix cache: caching a prompt's blocks failed")
        return logits

    def _restore_prefixes(self, prefix: PrefixCache) -> None:
        """Prompts about to start prefilling begin after their longest cached prefix. Looked up again each step
        until they start, so a prompt queued behind the first with its prefix still finds it once that is in."""
        for seq in self.scheduler.prefilling:
            buffer = seq.prefill
            assert buffer is not None
            if buffer.past:
                continue
            try:
                seq.cached_tokens = prefix.restore(seq.request.prompt_ids, buffer)
            except Exception:  # a failed copy is a miss: the prompt is prefilled in full
                log.exception("prefix cache: restoring a prompt's prefix failed; it is prefilled in full")

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        rows = []
        for seq in seqs:
            params = seq.params
            suppress: frozenset[int] = frozenset()
            if len(seq.output_ids) < params.min_new_tokens:
                suppress = params.stop_token_ids | (frozenset() if params.ignore_eos else self._eos_ids)
            seen = seq.seen_ids if params.repetition_penalty != 1.0 else ()
            rows.append(SamplingRow(params, seq.generator, seen, suppress))
        return sample(logits, rows, chosen_logprobs=self._observed)

    def _append(self, seq: Sequence, result: SampleResult, i: int) -> RowOutput:
        """Add row i's sampled token to its sequence, and end the sequence if the token does."""
        token = result.token_ids[i]
        seq.output_ids.append(token)
        params = seq.params
        reason: FinishReason | None = None
        if token in params.stop_token_ids:
            reason = FinishReason.STOP_TOKEN
        elif token in self._eos_ids and not params.ignore_eos:
            reason = FinishReason.EOS_TOKEN
        elif len(seq.output_ids) >= params.max_new_tokens:
            reason = FinishReason.LENGTH
        row = RowOutput(seq.key, token)
        if len(seq.output_ids) == 1:
            row.cached_tokens = seq.cached_tokens
        if result.chosen_logprobs is not None:
            row.logprob = result.chosen_logprobs[i]
        top = result.logprobs[i]
        if top is not None:
            row.top_ids, row.top_logprobs = top.top_ids, top.top_logprobs
        if reason is not None:
            seq.finish = row.finish = reason
        return row

    def _end(self, seq: Sequence, reason: FinishReason, error: str = "") -> RowOutput:
        """End a sequence that produced no token this step."""
        seq.finish = reason
        return RowOutput(seq.key, finish=reason, error=error)

    def _step_failed(self, phase: str, exc: Exception, size: int) -> tuple[FinishReason, str]:
        """Log a failed step and say how its requests end. Out of memory lowers the load that caused it:
        the batch size after a decode step, the prefill chunk after a prefill, so it does not repeat."""
        what = f"{type(exc).__name__}: {exc}"
        if not _is_out_of_memory(exc):
            log.exception("%s step failed; its requests end with an error", phase)
            return FinishReason.ERROR, what
        scheduler = self.scheduler
        if phase == "prefill":
            chunk = max(MIN_PREFILL_CHUNK_AFTER_OOM, min(scheduler.prefill_chunk_tokens, size) // 2)
            scheduler.prefill_chunk_tokens = chunk
            lowered = f"the prefill chunk is now {chunk} tokens"
        else:
            scheduler.max_batch_size = max(1, min(scheduler.max_batch_size, size) // 2)
            lowered = f"the batch size is now at most {scheduler.max_batch_size}"
        if self.runner.device.type == "cuda":
            torch.cuda.empty_cache()
        log.warning("out of memory in a %s step of %d; %s (%s)", phase, size, lowered, what)
        return FinishReason.OUT_OF_MEMORY, f"out of memory in a {phase} step ({what}); {lowered}"


def _generator(request: Request) -> torch.Generator:
    return torch.Generator().manual_seed(request.params.seed)


def _mark_aborted(seq: Sequence, reason: FinishReason, error: str) -> None:
    if seq.finish is None and seq.abort_reason is None:
        seq.abort_reason, seq.abort_error = reason, error
