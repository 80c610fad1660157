"""The policy: who waits, who runs, which tokens each step feeds, and who is preempted.

Highest priority first, then first come, first served; the head of the queue is never overtaken, so a
large request is not starved by small ones of its priority. A waiting request is admitted when a row
is free and the free blocks hold its prompt (after the cached blocks its prompt shares) with a block
to spare for each running row; its output's blocks are taken as it grows. When a growing row finds
no free block, the newest running request is preempted: its blocks are freed and it waits again at
the front of its priority, to be recomputed (prompt and output so far, mostly from the prefix cache)
and continue where it stopped. A prompt whose start another running prompt is still computing waits until
those blocks are cached, then shares them: a common prefix sent several times at once is computed once.

Every step feeds one forward: each decoding row's next token, then a chunk of each prompt being
prefilled, oldest first, within the step's token budget. The chunk is per prompt: one long prompt is split
over several steps so that running streams get a token every step, while prompts that arrive together are
prefilled together, within the budget, rather than one a step (32 prompts of 16-256 tokens sent at
once: 3 steps to prefill them all, 29 when the chunk was the step's). A prompt of up to LONG_PROMPT_CHUNKS
chunks slows the running streams for that many steps at most; a longer one would slow every step it spans
(on a CPU a step carrying a 128-token chunk lasts 2.7-3.5 decode steps, and a 2,048-token prompt spans 16
steps), so while streams decode a long prompt is fed a smaller chunk a step and takes longer to its first
token instead. A prompt is long by what it has to compute when admitted (after its cached prefix); a
preempted stream resuming never is. The smaller chunk is each long prompt's: a first version gave them one
allowance to share, so they queued behind each other (and the queue behind them), and a closed loop of 32
streams with prompts of 16-512 tokens fell from about 245 to 163 tok/s, its TTFT p50 from 0.7 to 10 s. A
long prompt whose blocks a waiting request could share (the queue waits for them) gets the whole chunk.
`schedule()` returns that as a StepPlan (plain data); `advance()` records what the runner did.
"""

from __future__ import annotations

import bisect

from modelserve.engine.block_manager import BlockManager
from modelserve.engine.lora_slots import LoraSlots
from modelserve.engine.request import FinishReason
from modelserve.engine.sequence import Sequence
from modelserve.engine.step_plan import NewRow, PromptScoring, RowPlan, StepPlan

# With no stream decoding nobody waits on a step, and a larger chunk gives the first token sooner.
IDLE_PREFILL_FACTOR = 8
# A prompt with more than this many chunks to compute is long: while streams decode it gets the long chunk.
# Fewer would pace prompts that slow the streams for only a few steps, at a high price: with 2, a closed loop
# of 32 streams with prompts of 16-512 tokens took 2.2x the median TTFT, its ITL p99 within the noise.
LONG_PROMPT_CHUNKS = 4


class Scheduler:
    """Owns the queues and the block manager; the engine core changes them only through these methods."""

    def __init__(
        self,
        blocks: BlockManager,
        max_batch_size: int,
        prefill_chunk_tokens: int,
        max_num_batched_tokens: int,
        prefix_caching: bool = True,
        lora_slots: LoraSlots | None = None,
        long_prefill_chunk_tokens: int = 0,
    ) -> None:
        if prefill_chunk_tokens < 1 or long_prefill_chunk_tokens < 0:
            raise ValueError(
                f"a prefill chunk of {prefill_chunk_tokens} tokens and a long one of {long_prefill_chunk_tokens}: "
                "the chunk must be 1 or more, the long chunk 0 (none) or more"
            )
        self.blocks = blocks
        self.lora_slots = lora_slots  # resident LoRA adapters (engine/lora.py); None: LoRA is off
        self.max_batch_size = max_batch_size
        self.prefill_chunk_tokens = prefill_chunk_tokens  # of each prompt, each step, while rows decode
        self.max_num_batched_tokens = max_num_batched_tokens  # of the whole step (every decoding row still runs)
        # Of each long prompt, each step, while rows decode (at most the chunk); 0: the chunk, like any prompt.
        self.long_prefill_chunk_tokens = long_prefill_chunk_tokens
        self.prefix_caching = prefix_caching  # share and cache full blocks
        self.waiting: list[Sequence] = []  # in admission order: highest priority, then oldest
        self.running: list[Sequence] = []  # hold blocks, in admission order
        self.preemptions = 0  # since the start
        self.admitted_prompt_tokens = 0  # since the start, each request's prompt once
        self._known: set[int] = set()  # keys the runner holds sampling state for
        self._ended: list[int] = []  # keys to tell the runner to forget at the next plan
        self._lora_loads: list[tuple[int, str]] = []  # adapters to load into their slots before the next step

    def add(self, seq: Sequence) -> None:
        bisect.insort(self.waiting, seq, key=_admission_order)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def prefilling(self) -> list[Sequence]:
        return [s for s in self.running if s.prefilling]

    @property
    def decoding(self) -> int:
        return sum(1 for s in self.running if not s.prefilling)

    def expire(self, now_s: float) -> None:
        """Mark every sequence whose deadline has passed; the step then ends it like an abort."""
        for seq in (*self.waiting, *self.running):
            deadline = seq.request.deadline_s
            if deadline is not None and now_s >= deadline and seq.abort_reason is None and seq.finish is None:
                seq.abort_reason = FinishReason.DEADLINE_EXCEEDED

    def take_aborted(self) -> list[Sequence]:
        """Remove and return the aborted sequences, freeing the blocks of those that held some."""
        aborted = [s for s in (*self.waiting, *self.running) if s.abort_reason is not None and s.finish is None]
        for seq in aborted:
            self.remove(seq)
        return aborted

    def remove(self, seq: Sequence) -> None:
        """A sequence ended: its blocks go back (cached blocks stay findable), its sampling state goes."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.table)
        self._release_lora(seq)
        if seq.key in self._known:
            self._known.discard(seq.key)
            self._ended.append(seq.key)

    def remove_all(self) -> list[Sequence]:
        """The loop is ending, or a step failed for everyone: every sequence, in any queue."""
        every = [*self.running, *self.waiting]
        for seq in every:
            self.remove(seq)
        return every

    # ---- one step -----------------------------------------------------------------------------------------

    def schedule(self) -> tuple[StepPlan, list[Sequence]]:
        """The next step's plan, and the sequences admitted for the first time by it."""
        plan = StepPlan(removed=self._ended)
        self._ended = []
        decoding = [s for s in self.running if not s.prefilling]
        chunk = self.prefill_chunk_tokens * (1 if decoding else IDLE_PREFILL_FACTOR)
        budget = max(self.max_num_batched_tokens, len(decoding))
        long_chunk = min(self.long_prefill_chunk_tokens or chunk, chunk) if decoding else chunk

        def feed(seq: Sequence) -> None:
            """Plan the next chunk of a prompt (its blocks were all taken at admission), within the step's budget."""
            nonlocal budget
            n = min(len(seq.tokens) - seq.computed, long_chunk if seq.long_prompt else chunk, budget)
            self._plan_row(plan, seq, n)
            budget -= n

        for seq in decoding:
            if seq in self.running and self._make_room(seq, 1):
                self._plan_row(plan, seq, 1)
                budget -= 1
        for seq in [s for s in self.running if s.prefilling]:  # after the decoding rows: none is preempted now
            if budget <= 0:
                break
            feed(seq)
        admitted: list[Sequence] = []
        while budget > 0 and len(self.running) < self.max_batch_size:
            # A request whose grammar is still being built is passed over, not waited for.
            head = next((s for s in self.waiting if s.grammar_ready), None)
            if head is None:
                break
            if pending := self._prefix_pending(head):
                pending.long_prompt = False  # the queue waits on its blocks: it gets the whole chunk from now on
                break
            if not self._admit(head):
                break
            feed(head)
            if not head.admitted:
                head.admitted = True
                admitted.append(head)
        for row in plan.rows:
            if row.key not in self._known:
                seq = next(s for s in self.running if s.key == row.key)
                self._known.add(row.key)
                plan.added.append(NewRow(row.key, seq.params, seq.request.prompt_ids))
        plan.lora_loads, self._lora_loads = self._lora_loads, []
        return plan, admitted

    def idle_plan(self) -> StepPlan | None:
        """With no work left, a plan that only frees what ended since the last one (None when nothing did):
        the runner drops that state now rather than at a step that may not come for a while."""
        if self.has_work() or not self._ended:
            return None
        plan = StepPlan(removed=self._ended)
        self._ended = []
        return plan

    def advance(self, plan: StepPlan) -> None:
        """The runner executed `plan`: the fed tokens are in KV memory, and their full blocks are cached."""
        by_key = {s.key: s for s in self.running}
        for row in plan.rows:
            seq = by_key.get(row.key)
            if seq is None:
                continue
            seq.computed = row.start + len(row.token_ids)
            if self.prefix_caching:
                self.blocks.commit(seq.table, seq.tokens, seq.computed)

    def _plan_row(self, plan: StepPlan, seq: Sequence, n: int) -> None:
        start = seq.computed
        sample = start + n == len(seq.tokens)
        scoring = None
        if seq.scoring_prompt:  # positions not scored yet (a preempted prompt keeps what it had)
            first, end = max(start, len(seq.prompt_scores)), min(start + n, seq.prompt_len - 1)
            if first < end:
                scoring = PromptScoring(first - start, seq.tokens[first + 1 : end + 1], seq.params.prompt_logprobs)
        tokens = seq.tokens[start : start + n]
        plan.rows.append(RowPlan(seq.key, tokens, start, list(seq.table.blocks), sample, scoring, seq.lora_slot))

    def _admit(self, seq: Sequence) -> bool:
        """Give `seq` its blocks (shared cached ones first) for all its tokens so far, if they fit now."""
        blocks, lora = self.blocks, seq.request.lora
        shared = blocks.match_prefix(seq.tokens, lora) if self.prefix_caching and not seq.scoring_prompt else []
        need = blocks.blocks_for(len(seq.tokens)) - len(shared)
        # Headroom of a block per running row, which may start a new block next step: without it a newcomer
        # would take the blocks the running rows grow into, and be preempted again at once.
        if not blocks.can_allocate(need + len(self.running), shared):
            return False
        if lora:  # and a slot for its adapter (it waits, and the queue behind it, while every slot is in use)
            assert self.lora_slots is not None, "the frontend refuses an adapter when LoRA is off"
            got = self.lora_slots.acquire(lora)
            if got is None:
                return False
            seq.lora_slot, fresh = got
            if fresh:
                self._lora_loads.append((seq.lora_slot, lora))
        blocks.allocate(seq.table, len(seq.tokens), shared, lora)
        seq.computed = len(shared) * blocks.block_size
        to_compute = len(seq.tokens) - seq.computed
        seq.long_prompt = seq.output_len == 0 and to_compute > LONG_PROMPT_CHUNKS * self.prefill_chunk_tokens
        if not seq.admitted:
            seq.cached_tokens = seq.computed
            self.admitted_prompt_tokens += seq.prompt_len
        self.waiting.remove(seq)
        self.running.append(seq)
        return True

    def _prefix_pending(self, seq: Sequence) -> Sequence | None:
        """The running prompt still computing blocks that `seq` could share once they are cached: `seq`
        waits for them (the queue behind it too, keeping its order) rather than compute them a second time.
        This is how the n samples of one prompt, or requests that arrive together with one long system
        prompt, prefill their common part once; the wait ends as the other's prefill goes on, every step."""
        if not self.prefix_caching or seq.scoring_prompt:
            return None
        size = self.blocks.block_size
        shareable = (len(seq.tokens) - 1) // size * size  # match_prefix never covers a prompt's last token
        for other in self.running:
            cached = other.computed // size * size  # what advance() has committed of it
            if not other.prefilling or cached >= shareable or other.request.lora != seq.request.lora:
                continue
            # Wait when the two share every block up to and including the first one not yet cached.
            end = cached + size
            if end <= min(shareable, len(other.tokens)) and all(
                seq.tokens[i : i + size] == other.tokens[i : i + size] for i in range(0, end, size)
            ):
                return other
        return None

    def _make_room(self, seq: Sequence, n: int) -> bool:
        """Blocks for `seq`'s next `n` tokens, preempting the newest running sequences while there are none.
        False when `seq` itself had to go."""
        target = seq.computed + n
        while not self.blocks.can_grow(seq.table, target):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        self.blocks.grow(seq.table, target)
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and queue it again; it keeps its tokens and its sampling state."""
        self.running.remove(seq)
        self.blocks.free(seq.table)
        self._release_lora(seq)
        seq.computed = 0
        self.preemptions += 1
        self.add(seq)

    def _release_lora(self, seq: Sequence) -> None:
        if seq.lora_slot:
            assert self.lora_slots is not None
            self.lora_slots.release(seq.lora_slot)
            seq.lora_slot = 0


def _admission_order(seq: Sequence) -> tuple[int, int]:
    return (-seq.request.priority, seq.key)  # keys grow with arrival
