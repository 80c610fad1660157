"""The engine core: schedule -> one forward -> sample, one step at a time, token ids only.

It knows no asyncio, no text and no transport: commands come in through
`apply()`, and each `step()` returns ONE StepOutput for every row it touched.
The same core runs on a thread of the server process (engine.py, the library
and the benchmark's baseline) or in a process of its own (core_process.py).

Each step the scheduler emits a plain StepPlan (scheduler.py, step_plan.py) and
the runner executes it (runner.py): this module only sizes the KV memory, turns
sampled tokens into outputs and decides every ending of a request, in `_end()`:
its own token (a stop token, EOS, the length limit), an abort (a cancel, a
deadline, a stop string the frontend found, the drain), or a failed step. A
sequence's text is the frontend's business.
"""

from __future__ import annotations

import errno
import logging
import time

import torch
from tokenizers import Tokenizer
from transformers import PreTrainedModel

from modelserve.config import (
    AUTO_LONG_PREFILL_CHUNK_CPU,
    AUTO_MAX_NUM_BATCHED_TOKENS_CPU,
    AUTO_MAX_NUM_BATCHED_TOKENS_CUDA,
    AUTO_PREFILL_CHUNK_CPU,
    AUTO_PREFILL_CHUNK_CUDA,
    DEFAULT_CPU_KV_BYTES,
    KV_BLOCK_TOKENS,
)
from modelserve.engine.block_manager import BlockManager
from modelserve.engine.grammar import GrammarError, Grammars
from modelserve.engine.kv_memory import memory_warning
from modelserve.engine.lora_slots import LoraSlots
from modelserve.engine.protocol import (
    Abort,
    AbortAll,
    AddLora,
    AddRequest,
    Command,
    FlushCache,
    RemoveLora,
    RowOutput,
    StartProfile,
    StepOutput,
    StopProfile,
)
from modelserve.engine.request import EngineStats, FinishReason, StepRecord
from modelserve.engine.runner import ModelRunner, StepResult
from modelserve.engine.sampler import SampleResult
from modelserve.engine.scheduler import IDLE_PREFILL_FACTOR, LONG_PROMPT_CHUNKS, Scheduler
from modelserve.engine.sequence import Sequence
from modelserve.engine.step_plan import PromptScores, StepPlan
from modelserve.engine.step_profiler import StepProfiler
from modelserve.engine.tensor_parallel import TensorParallel
from modelserve.models.lora import LoraAdapter, load_weights

log = logging.getLogger(__name__)

MIN_PREFILL_CHUNK_AFTER_OOM = 16
# While idle, the core faults in KV memory ahead of use (kv_memory.py): up to this share of the budget beyond
# the blocks used so far, this much a call (or one block, where a block is more), so a request that arrives
# waits for at most one call (for 2 MiB, about 1 ms here alone, 8 ms beside a process holding memory).
FILL_AHEAD_FRACTION = 0.25
FILL_CHUNK_BYTES = 2 << 20
GRAMMAR_WAIT_S = 0.05  # an idle core's wait for a grammar being built, before it looks at its inbox again


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
        max_num_batched_tokens: int = 0,
        block_size: int = KV_BLOCK_TOKENS,
        own_forward: bool = True,
        tokenizer: Tokenizer | None = None,
        max_loras: int = 0,
        max_lora_rank: int = 16,
        tp: TensorParallel | None = None,
        long_prefill_chunk_tokens: int = 0,
    ) -> None:
        self._eos_ids = frozenset(eos_token_ids)
        vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.grammars = Grammars(tokenizer, vocab_size, tuple(eos_token_ids))  # structured output's matchers
        self.runner = ModelRunner(model, self._eos_ids, max_sequence_length, own_forward, self.grammars, tp)
        shape = self.runner.kv_shape
        num_blocks = self._kv_budget_bytes(kv_cache_bytes, gpu_memory_fraction) // (shape.bytes_per_token * block_size)
        self.blocks = BlockManager(num_blocks, block_size)
        self.profiler = StepProfiler()
        self.runner.allocate_kv(num_blocks, block_size)
        self.kv_budget_tokens = num_blocks * block_size
        self.max_sequence_tokens = min(max_sequence_length, self.kv_budget_tokens)
        """The longest sequence (prompt + max_new_tokens) that can ever run: context and KV budget."""
        cuda = self.runner.device.type == "cuda"
        chunk = prefill_chunk_tokens or (AUTO_PREFILL_CHUNK_CUDA if cuda else AUTO_PREFILL_CHUNK_CPU)
        long_chunk = long_prefill_chunk_tokens or (0 if cuda else AUTO_LONG_PREFILL_CHUNK_CPU)
        # The automatic step budget always holds one prompt's chunk when no stream runs.
        step_tokens = max_num_batched_tokens or max(
            AUTO_MAX_NUM_BATCHED_TOKENS_CUDA if cuda else AUTO_MAX_NUM_BATCHED_TOKENS_CPU, chunk * IDLE_PREFILL_FACTOR
        )
        lora_slots = None
        if max_loras:
            self.runner.enable_lora(max_loras, max_lora_rank)
            lora_slots = LoraSlots(max_loras)
        self.adapters = self.runner.adapters  # LoRA adapters by name, their weights on the CPU
        self.scheduler = Scheduler(
            self.blocks, max_batch_size, chunk, step_tokens, prefix_caching, lora_slots, long_chunk
        )
        if cuda_graphs and max_loras:
            log.info("decode runs eagerly: CUDA graphs do not capture the LoRA adapters' products (--enable-lora)")
        elif cuda_graphs and tp is not None:
            log.info("decode runs eagerly: CUDA graphs are not captured with --tensor-parallel-size")
        elif cuda_graphs:
            self.runner.use_cuda_graphs(max_batch_size, self.max_sequence_tokens)
        self.prefix_caching = prefix_caching
        # Telemetry watches this core: it reads each response's mean log-probability (a logsumexp over the
        # vocabulary per row and step) and each step's own time (a device sync), so only then are they paid.
        self._observed = observed
        self._live: dict[int, Sequence] = {}
        self._step = 0
        log.info(
            "KV memory: %d blocks of %d tokens (%.2f GiB at %d bytes/token%s), up to %d rows; prefix caching %s",
            num_blocks,
            block_size,
            self.kv_budget_tokens * shape.bytes_per_token / 2**30,
            shape.bytes_per_token,
            f" on each of {tp.world} ranks, which hold a share of the KV heads each" if tp is not None else "",
            max_batch_size,
            "on (the same blocks)" if prefix_caching else "off",
        )
        self._fill_ahead_blocks = int(num_blocks * FILL_AHEAD_FRACTION)
        self._fill_chunk_blocks = max(1, FILL_CHUNK_BYTES // (shape.bytes_per_token * block_size))
        if warning := memory_warning(self.kv_budget_tokens * shape.bytes_per_token, self.runner.device):
            log.warning("%s", warning)
            self._fill_ahead_blocks = 0
        log.info(
            "steps: up to %d tokens; while streams run, %d tokens of each prompt a step%s",
            step_tokens,
            chunk,
            f" ({long_chunk} of each with over {LONG_PROMPT_CHUNKS * chunk} to compute)"
            if 0 < long_chunk < chunk
            else "",
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
            seq = Sequence(command.key, command.request)
            self._live[seq.key] = seq
            self.scheduler.add(seq)
            if seq.params.grammar:
                self._grammar_ready(seq)
            if seq.request.lora and seq.request.lora not in self.adapters:  # unloaded since the frontend checked
                _mark_aborted(seq, FinishReason.CANCELLED, _unloaded(seq.request.lora))
        elif isinstance(command, Abort):
            target = self._live.get(command.key)
            if target is not None:
                _mark_aborted(target, command.reason, command.error)
        elif isinstance(command, AbortAll):
            for live in self._live.values():
                _mark_aborted(live, command.reason, command.error)
        elif isinstance(command, FlushCache):
            log.info("prefix cache flushed: %d cached blocks dropped", self.blocks.flush_cache())
        elif isinstance(command, StartProfile):
            self.profiler.start(command)
        elif isinstance(command, StopProfile):
            self.profiler.stop()
        elif isinstance(command, AddLora):
            adapter = LoraAdapter(command.name, command.path, command.rank, command.scaling, tuple(command.modules))
            self.adapters[command.name] = load_weights(adapter, self.runner.model.dtype)
            log.info("LoRA adapter %r loaded from %s (rank %d)", command.name, command.path, command.rank)
        elif isinstance(command, RemoveLora):
            self.adapters.pop(command.name, None)
            if self.scheduler.lora_slots is not None:
                self.scheduler.lora_slots.forget(command.name)
            for seq in self.scheduler.waiting:
                if seq.request.lora == command.name and not seq.admitted:
                    _mark_aborted(seq, FinishReason.CANCELLED, _unloaded(command.name))
            log.info("LoRA adapter %r unloaded", command.name)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def can_fill(self) -> bool:
        """Is there KV memory to fault in ahead of use (kv_memory.py)? Asked when the core has no work."""
        kv = self.runner.kv
        assert kv is not None
        return self._fill_ahead_blocks > 0 and kv.filled_blocks < self._fill_target()

    def fill(self) -> None:
        """Fault in the next 2 MiB of KV memory ahead of use; where the kernel cannot, stop for good."""
        kv = self.runner.kv
        assert kv is not None
        try:
            kv.fill(min(self._fill_target(), kv.filled_blocks + self._fill_chunk_blocks))
        except OSError as exc:
            self._fill_ahead_blocks = 0
            if exc.errno == errno.EINVAL:  # a kernel before 5.14
                log.info("KV memory is faulted in as steps first write it: this kernel cannot do it ahead")
            else:
                log.warning("KV memory is no longer faulted in ahead of use: %s", exc)

    def _fill_target(self) -> int:
        """The block the idle core fills up to: a share of the budget beyond the blocks ever used."""
        return min(self.blocks.num_blocks, self.blocks.touched_blocks + self._fill_ahead_blocks)

    # ---- one step ---------------------------------------------------------------------------------------

    def step(self) -> StepOutput:
        out: list[RowOutput] = []
        scheduler = self.scheduler
        step_started = time.perf_counter()
        scheduler.expire(time.monotonic())
        for seq in [s for s in scheduler.waiting if not s.grammar_ready]:
            self._grammar_ready(seq)
        for seq in scheduler.take_aborted():
            out.append(self._end(seq, seq.abort_reason or FinishReason.CANCELLED, seq.abort_error))
        plan, admitted = scheduler.schedule()
        if not plan.rows and self.grammars.building:  # only requests whose grammar is being built: wait for one
            self.grammars.wait(GRAMMAR_WAIT_S)
        running = {seq.key: seq for seq in scheduler.running}
        decoded = sum(1 for r in plan.rows if len(r.token_ids) == 1 and r.start >= running[r.key].prompt_len)
        prefilled = plan.num_tokens - decoded
        executed, result = self._execute(plan, running, decoded, prefilled, out)
        scheduler.advance(executed)
        for key, scores in result.prompt_scores.items():
            running[key].prompt_scores.extend(scores)
        if result.sample is not None:
            out.extend(self._append(running[key], result.sample, i) for i, key in enumerate(executed.sampled_keys))
        idle = scheduler.idle_plan()
        if idle is not None:
            self.runner.execute(idle)
        if plan.rows and self._observed:
            self.runner.synchronize()  # so the step's time is its own in the step metrics
        for row in out:
            if row.finish is not None:
                self._live.pop(row.key, None)
        self._step += 1
        record = None
        if plan.rows:
            step_s = time.perf_counter() - step_started
            # One forward does both now: the step's time is split between them by their token counts.
            prefill_s = step_s * prefilled / plan.num_tokens
            record = StepRecord(decoded, prefilled, prefill_s, step_s - prefill_s, step_s)
        admitted_keys = [seq.key for seq in admitted]
        self.profiler.step()
        return StepOutput(self._step, out, admitted_keys, self.stats(), record, self.blocks.take_events())

    def end_all(self, reason: FinishReason, error: str) -> StepOutput:
        """The loop is ending: close every request it holds."""
        out = [self._end(seq, reason, error) for seq in self.scheduler.remove_all() if seq.finish is None]
        idle = self.scheduler.idle_plan()
        if idle is not None:
            self.runner.execute(idle)
        self._live.clear()
        self._step += 1
        self.profiler.stop()  # a profile still running is written
        return StepOutput(self._step, out, [], self.stats(), None)

    def stats(self) -> EngineStats:
        scheduler, blocks = self.scheduler, self.blocks
        gpu_allocated = gpu_reserved = 0
        if self.runner.device.type == "cuda":
            gpu_allocated = torch.cuda.memory_allocated(self.runner.device)
            gpu_reserved = torch.cuda.memory_reserved(self.runner.device)
        prefilling = len(scheduler.prefilling)
        lora = scheduler.lora_slots is not None  # the adapters are named only where any can run
        return EngineStats(
            running=len(scheduler.running) - prefilling,
            waiting=len(scheduler.waiting) + prefilling,
            prefilling=prefilling,
            kv_budget_tokens=self.kv_budget_tokens,
            kv_tokens_used=blocks.used_blocks * blocks.block_size,
            prefix_cache_budget_tokens=self.kv_budget_tokens if self.prefix_caching else 0,
            prefix_cache_tokens=blocks.cached_blocks() * blocks.block_size,
            prefix_cache_hit_tokens=blocks.hit_tokens,
            admitted_prompt_tokens=scheduler.admitted_prompt_tokens,
            max_batch_size=scheduler.max_batch_size,
            gpu_allocated_bytes=gpu_allocated,
            gpu_reserved_bytes=gpu_reserved,
            lora_running=_adapters(scheduler.running) if lora else (),
            lora_waiting=_adapters(scheduler.waiting) if lora else (),
        )

    # ---- pieces -----------------------------------------------------------------------------------------

    def _execute(
        self, plan: StepPlan, running: dict[int, Sequence], decoded: int, prefilled: int, out: list[RowOutput]
    ) -> tuple[StepPlan, StepResult]:
        """Run the plan; return what ran and its samples. A failed step fails the requests it touched, not the
        engine: its prompt chunks end, and its decoding rows are tried once more on their own (so a prompt
        whose prefill fails does not take the running streams with it), ending only if that fails too. With
        tensor parallelism a failed step ends the engine core (and so the server, to be restarted)."""
        try:
            return plan, self.runner.execute(plan, chosen_logprobs=self._observed)
        except Exception as exc:
            if self.runner.tp is not None:  # the other ranks may be inside this step's collectives: none can go on
                raise
            reason, error = self._step_failed(exc, decoded, prefilled)
        decoding = [row for row in plan.rows if len(row.token_ids) == 1 and row.sample] if prefilled else []
        retry = StepPlan(rows=decoding)
        for row in plan.rows:
            if row not in decoding:
                self._fail(running[row.key], reason, error, out)
        if decoding:
            try:
                return retry, self.runner.execute(retry, chosen_logprobs=self._observed)
            except Exception as exc:
                reason, error = self._step_failed(exc, len(decoding), 0)
            for row in decoding:
                self._fail(running[row.key], reason, error, out)
        return StepPlan(), StepResult()

    def _fail(self, seq: Sequence, reason: FinishReason, error: str, out: list[RowOutput]) -> None:
        self.scheduler.remove(seq)
        out.append(self._end(seq, reason, error))

    def _append(self, seq: Sequence, result: SampleResult, i: int) -> RowOutput:
        """Add row i's sampled token to its sequence, and end the sequence if the token does."""
        token = result.token_ids[i]
        seq.tokens.append(token)
        params = seq.params
        reason: FinishReason | None = None
        if token in params.stop_token_ids:
            reason = FinishReason.STOP_TOKEN
        elif token in self._eos_ids and not params.ignore_eos:
            reason = FinishReason.EOS_TOKEN
        elif seq.output_len >= params.max_new_tokens:
            reason = FinishReason.LENGTH
        row = RowOutput(seq.key, token)
        if seq.output_len == 1:
            row.cached_tokens = seq.cached_tokens
            if seq.params.prompt_logprobs >= 0:
                scores, seq.prompt_scores = seq.prompt_scores, PromptScores()
                row.prompt_logprobs, row.prompt_ranks = scores.logprobs, scores.ranks
                row.prompt_top_ids, row.prompt_top_logprobs = scores.top_ids, scores.top_logprobs
        if result.chosen_logprobs is not None:
            row.logprob = result.chosen_logprobs[i]
        top = result.logprobs[i]
        if top is not None:
            row.top_ids, row.top_logprobs = top.top_ids, top.top_logprobs
        if reason is not None:
            seq.finish = row.finish = reason
            self.scheduler.remove(seq)
        return row

    def _end(self, seq: Sequence, reason: FinishReason, error: str = "") -> RowOutput:
        """End a sequence that produced no token this step (the scheduler has let it go)."""
        seq.finish = reason
        return RowOutput(seq.key, finish=reason, error=error)

    def _step_failed(self, exc: Exception, decoded: int, prefilled: int) -> tuple[FinishReason, str]:
        """Log a failed step and say how its requests end. Out of memory lowers the load that caused it (the
        prefill chunk when the step prefilled, else the batch size), so it does not repeat."""
        what = f"{type(exc).__name__}: {exc}"
        phase = "prefill" if prefilled else "decode"  # a prefill step may carry decoding rows too
        if not _is_out_of_memory(exc):
            log.exception(
                "a %s step of %d decoding rows and %d prompt tokens failed; its requests end with an error",
                phase,
                decoded,
                prefilled,
            )
            return FinishReason.ERROR, what
        scheduler = self.scheduler
        if prefilled:
            half = max(MIN_PREFILL_CHUNK_AFTER_OOM, prefilled // 2)
            scheduler.prefill_chunk_tokens = min(scheduler.prefill_chunk_tokens, half)
            scheduler.max_num_batched_tokens = min(scheduler.max_num_batched_tokens, decoded + half)
            lowered = f"prompt tokens per step are now at most {half}"
        else:
            scheduler.max_batch_size = max(1, min(scheduler.max_batch_size, decoded) // 2)
            lowered = f"the batch size is now at most {scheduler.max_batch_size}"
        if self.runner.device.type == "cuda":
            torch.cuda.empty_cache()
        log.warning(
            "out of memory in a %s step of %d decoding rows and %d prompt tokens; %s (%s)",
            phase,
            decoded,
            prefilled,
            lowered,
            what,
        )
        return FinishReason.OUT_OF_MEMORY, f"out of memory in a {phase} step ({what}); {lowered}"

    def _grammar_ready(self, seq: Sequence) -> None:
        """Mark `seq` ready once its grammar's matcher is built; a grammar that fails to build ends it."""
        try:
            seq.grammar_ready = self.grammars.ready(seq.params.grammar)
        except GrammarError as exc:
            seq.grammar_ready = True
            _mark_aborted(seq, FinishReason.ERROR, f"the request's structured output grammar: {exc}")


def _adapters(seqs: list[Sequence]) -> tuple[str, ...]:
    return tuple(sorted({seq.request.lora for seq in seqs if seq.request.lora}))


def _unloaded(name: str) -> str:
    return f"the LoRA adapter {name!r} was unloaded before the request started"


def _mark_aborted(seq: Sequence, reason: FinishReason, error: str) -> None:
    if seq.finish is None and seq.abort_reason is None:
        seq.abort_reason, seq.abort_error = reason, error
