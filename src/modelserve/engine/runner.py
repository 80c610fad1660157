"""The compute: execute a step plan as ONE forward, then sample the rows that asked.

The runner owns every tensor of the engine: the KV memory (kv_memory.py), each request's sampling state
(sampling_state.py) and the step's input tensors, built here from the plan's plain lists. A plan's
tokens form one flat sequence: decoding rows' single tokens first, then prompt chunks; positions and
KV slots come from each row's own start and block table, and attention (attention.py) keeps each row
to its own context.

The forward is our own for the Llama family (llama_forward.py) and GPT-2 (gpt2_forward.py) unless
`own_forward` is off. On a CPU the linear layers are first packed for oneDNN (cpu_linears.py), in the
model itself. Any other model runs its transformers forward with the paged attention (transformers'
AttentionInterface), set in a copy of the model's modules that shares every parameter and buffer: the
model object the caller holds still runs generate() as loaded, from any thread, while the engine's copy
runs steps. A model whose attention bypasses that interface gets its context gathered for it
(gathered_attention.py).

On CUDA, attention avoids cuDNN's SDPA backend: it builds an execution plan for every new sequence
shape, and a continuous-batching engine makes a new shape almost every step. Measured on an H100 with
a 1B Llama in bf16: 90 ms a decode step with it, 25 ms without (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
from dataclasses import dataclass, field

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface, DynamicCache, PreTrainedModel

from modelserve.engine.attention import PAGED_ATTENTION, PrefillRow, StepContext, paged_attention, step_context
from modelserve.engine.cpu_linears import Linears
from modelserve.engine.cuda_graphs import DecodeGraphs
from modelserve.engine.gathered_attention import GatheringCache, union_mask
from modelserve.engine.gpt2_forward import GPT2Forward, supports_gpt2
from modelserve.engine.grammar import Grammars
from modelserve.engine.kv_memory import KVMemory, KVShape
from modelserve.engine.llama_forward import LlamaForward, supports
from modelserve.engine.lora import LoraTensors, LoraWeights
from modelserve.engine.paged_decode_cpu import load as load_decode_kernel
from modelserve.engine.prompt_logprobs import score
from modelserve.engine.sampler import SampleResult, sample
from modelserve.engine.sampling_state import SamplingStates
from modelserve.engine.step_plan import PromptScores, StepPlan
from modelserve.engine.tensor_parallel import TensorParallel

log = logging.getLogger(__name__)

_CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

AttentionInterface.register(PAGED_ATTENTION, paged_attention)


@dataclass
class StepResult:
    """What a step's forward gave: the sampled rows' tokens, and the prompt chunks' scores (by key)."""

    sample: SampleResult | None = None
    prompt_scores: dict[int, PromptScores] = field(default_factory=dict)


class ModelRunner:
    def __init__(
        self,
        model: PreTrainedModel,
        eos_token_ids: frozenset[int],
        max_positions: int,
        own_forward: bool = True,
        grammars: Grammars | None = None,
        tp: TensorParallel | None = None,
    ) -> None:
        self.model = model
        self.device = model.device
        self.tp = tp
        self.kv_shape = self._probe_kv_shape()
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        linears = Linears(model)
        self.own: LlamaForward | GPT2Forward | None = None
        if own_forward and supports(model):
            self.own = LlamaForward(model, max_positions, linears, tp)
        elif own_forward and supports_gpt2(model):
            self.own = GPT2Forward(model, linears)
        if self.own is None:
            linears.pack_model(model)
        linears.release_originals(model)
        linears.log()
        self._paged = _paged_copy(model) if self.own is None else model
        self.states = SamplingStates(self.device, self.vocab_size, eos_token_ids, grammars)
        self.kv: KVMemory | None = None
        self.gathered = False  # its attention bypasses the AttentionInterface (gathered_attention.py)
        self.graphs: DecodeGraphs | None = None
        self.decode_kernel = self.device.type == "cpu" and self._load_decode_kernel()
        self.lora: LoraWeights | None = None
        self.adapters: dict[str, LoraTensors] = {}  # the LoRA adapters a plan may load, by name (the core's)

    def enable_lora(self, max_loras: int, max_rank: int) -> None:
        """Room for `max_loras` resident adapters of rank up to `max_rank` (engine/lora.py)."""
        if self.tp is not None:
            raise ValueError("LoRA adapters do not combine with --tensor-parallel-size (yet): serve them on one rank")
        if not isinstance(self.own, LlamaForward):
            raise ValueError(
                f"LoRA adapters need modelserve's own Llama-family forward; {type(self.model).__name__} "
                "does not run on it (a Llama, Mistral, Qwen2 or Qwen3 model, without --no-own-forward)"
            )
        self.lora = LoraWeights(self.model.config, max_loras, max_rank, self.model.dtype, self.device)
        log.info("LoRA: %d adapter slots of rank up to %d", max_loras, max_rank)

    @staticmethod
    def _load_decode_kernel() -> bool:
        problem = load_decode_kernel()
        if problem is None:
            log.info("decode attention reads the paged KV memory in place (paged_decode_cpu.py)")
            return True
        log.warning(
            "decode attention gathers every row's context for SDPA, slower on a CPU: the paged decode kernel "
            "could not be built (%s)",
            problem,
        )
        return False

    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        if self.tp is not None and self.tp.rank == 0:  # every rank's KV memory has the same blocks
            self.tp.broadcast_int(num_blocks)
        self.kv = KVMemory(self.kv_shape, num_blocks, block_size)
        if self.own is not None:
            module = "llama_forward.py" if isinstance(self.own, LlamaForward) else "gpt2_forward.py"
            log.info("%s runs on modelserve's own forward (%s)", type(self.model).__name__, module)
            return
        self.gathered = not self._attention_is_paged()
        if self.gathered:
            kinds = set(getattr(self.model.config, "layer_types", None) or ())
            if getattr(self.model.config, "sliding_window", None) or "sliding_attention" in kinds:
                raise ValueError(
                    f"{type(self.model).__name__}'s attention does not go through transformers' AttentionInterface "
                    "and it has sliding-window layers: the engine cannot window its attention"
                )
            log.info(
                "%s's attention does not go through transformers' AttentionInterface: each step gathers every "
                "row's context for it (gathered_attention.py), slower than the paged attention",
                type(self.model).__name__,
            )

    @torch.inference_mode()
    def _attention_is_paged(self) -> bool:
        """Does every layer of the engine's copy call the paged attention? One token through it tells."""
        assert self.kv is not None
        pad = torch.tensor([self.kv.pad_slot], device=self.device)
        zero = torch.zeros(1, dtype=torch.long, device=self.device)
        context = StepContext(self.kv.keys, self.kv.values, pad, pad[None], zero, zero, [], self.kv.workspace)
        try:
            with step_context(context):
                self._paged(input_ids=zero[None], position_ids=zero[None], use_cache=False, logits_to_keep=1)
        except Exception:  # its own attention code met what the paged attention left it (no mask): not paged
            return False
        return context.calls == self.kv_shape.n_layers

    def use_cuda_graphs(self, max_rows: int, max_width: int) -> None:
        """Replay decode-only steps from CUDA graphs, if this model's logits are its LM head applied to its
        decoder's output (cuda_graphs.py)."""
        assert self.kv is not None, "allocate_kv() first"
        if self.device.type != "cuda" or self.gathered:
            return
        if not self._logits_are_lm_head():
            log.info("decode runs eagerly: this model's logits are more than its LM head (a soft-cap or a scale)")
            return
        log.info("decode replays CUDA graphs, captured per batch and width bucket on first use (--enforce-eager: off)")
        self.graphs = DecodeGraphs(self.decoder_forward, self.kv, max_rows, max_width)

    @torch.inference_mode()
    def _logits_are_lm_head(self) -> bool:
        ids = torch.arange(1, 5, device=self.device)[None, :]
        full = self.model(input_ids=ids).logits[0, -1]
        hidden = self.model.get_decoder()(input_ids=ids).last_hidden_state[0, -1]
        return bool(torch.allclose(full.float(), self.model.get_output_embeddings()(hidden).float(), atol=1e-3))

    def synchronize(self) -> None:
        """Wait for queued device work, so a phase's timing is its own."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def _probe_kv_shape(self) -> KVShape:
        """One token through the model tells the KV geometry for any architecture."""
        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=self.device), cache=cache, use_cache=True)
        keys = cache.layers[0].keys
        assert keys is not None
        return KVShape(len(cache.layers), keys.shape[1], keys.shape[3], keys.dtype, keys.device)

    # ---- one step -----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, plan: StepPlan, chosen_logprobs: bool = False) -> StepResult:
        """Run `plan`'s forward; sample the rows it marks, and score the prompt tokens it names."""
        for key in plan.removed:
            self.states.remove(key)
        for new in plan.added:
            self.states.add(new)
        for slot, name in plan.lora_loads:
            assert self.lora is not None
            self.lora.load(slot, self.adapters[name])
        if not plan.rows:
            return StepResult()
        if self.tp is not None:  # the other ranks run the same forward on their shards
            self.tp.broadcast_plan(plan)
        input_ids, positions, kept, every_row, context = self._inputs(plan)
        if self.gathered:
            logits = self.gathered_forward(input_ids, positions, kept, context, plan)
        else:
            logits = self.forward(input_ids, positions, kept, every_row, context)
        keys = plan.sampled_keys
        result = StepResult()
        first = len(keys)  # the kept logits: the sampled rows' first, then the scored prompt tokens, row by row
        for row in plan.rows:
            if row.scoring is not None:
                end = first + len(row.scoring.targets)
                result.prompt_scores[row.key] = score(logits[first:end], row.scoring.targets, row.scoring.top)
                first = end
        if keys:
            result.sample = sample(logits[: len(keys)], self.states.rows(keys), chosen_logprobs=chosen_logprobs)
            self.states.record(keys, result.sample.token_ids)
        return result

    @torch.inference_mode()
    def forward_only(self, plan: StepPlan) -> None:
        """A rank other than 0: its share of `plan`'s forward (rank 0 computes the logits and samples)."""
        assert self.own is not None
        input_ids, positions, _, _, context = self._inputs(plan)
        with self._attention_backends():
            self.own.hidden_states(input_ids, positions, context)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kept: torch.Tensor,
        every_row: bool,
        context: StepContext,
    ) -> torch.Tensor:
        """Logits [kept tokens, vocab] at the step's `kept` token indices; `every_row`: they are one per row,
        in order (a decode-only step that scores nothing), which is what a CUDA graph replays."""
        if (
            every_row
            and self.graphs is not None
            and not context.prefills
            and context.decode_gather is not None
            and context.lora is None
        ):
            hidden = self.graphs.hidden_states(input_ids, positions, context)
            if hidden is not None:
                logits: torch.Tensor = self.model.get_output_embeddings()(hidden)
                return logits
        if self.own is not None:
            with self._attention_backends():
                hidden = self.own.hidden_states(input_ids, positions, context)
                return self.own.logits(hidden.index_select(0, kept))
        with step_context(context), self._attention_backends():
            out = self._paged(
                input_ids=input_ids[None],
                position_ids=positions[None],
                use_cache=False,
                logits_to_keep=kept,
            )
        logits = out.logits[0]
        return logits

    def gathered_forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kept: torch.Tensor,
        context: StepContext,
        plan: StepPlan,
    ) -> torch.Tensor:
        """The forward of a model whose attention bypasses the AttentionInterface (gathered_attention.py)."""
        assert self.kv is not None
        size, device = self.kv.block_size, self.device
        union: list[int] = []
        column_rows: list[int] = []
        column_positions: list[int] = []
        token_rows: list[int] = []
        for i, row in enumerate(plan.rows):
            end = row.start + len(row.token_ids)
            union += [row.block_table[p // size] * size + p % size for p in range(end)]
            column_rows += [i] * end
            column_positions += range(end)
            token_rows += [i] * len(row.token_ids)
        mask = union_mask(
            _long(token_rows, device),
            positions,
            _long(column_rows, device),
            _long(column_positions, device),
            self.model.dtype,
        )
        cache = GatheringCache(self.kv_shape.n_layers, context, _long(union, device))
        with self._attention_backends():
            out = self.model(
                input_ids=input_ids[None],
                position_ids=positions[None],
                attention_mask=mask,
                cache=cache,
                use_cache=True,
                logits_to_keep=kept,
            )
        logits: torch.Tensor = out.logits[0]
        return logits

    def decoder_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, context: StepContext) -> torch.Tensor:
        """The decoder stack alone (no LM head): hidden states [tokens, hidden]."""
        if self.own is not None:
            with step_context(context), self._attention_backends():
                return self.own.hidden_states(input_ids, positions, context)
        with step_context(context), self._attention_backends():
            out = self._paged.get_decoder()(input_ids=input_ids[None], position_ids=positions[None], use_cache=False)
        hidden: torch.Tensor = out.last_hidden_state[0]
        return hidden

    def _inputs(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool, StepContext]:
        assert self.kv is not None, "allocate_kv() first"
        size, device = self.kv.block_size, self.device
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sampled: list[int] = []
        scored: list[int] = []
        lora_slots: list[int] = []
        for row in plan.rows:
            blocks_of = row.block_table
            if self.lora is not None:
                lora_slots += [row.lora_slot] * len(row.token_ids)
            span = range(row.start, row.start + len(row.token_ids))
            if row.scoring is not None:
                first = len(ids) + row.scoring.first
                scored += range(first, first + len(row.scoring.targets))
            ids += row.token_ids
            positions += span
            slots += [blocks_of[p // size] * size + p % size for p in span]
            if row.sample:
                sampled.append(len(ids) - 1)
        decoding = 0
        while decoding < len(plan.rows) and len(plan.rows[decoding].token_ids) == 1:
            decoding += 1
        decode_gather = decode_positions = decode_columns = None
        if decoding:
            rows = plan.rows[:decoding]
            width = max(row.start for row in rows) + 1
            blocks = -(-width // size)
            tables = torch.tensor([(row.block_table + [0] * blocks)[:blocks] for row in rows], device=device)
            decode_columns = torch.arange(width, device=device)
            decode_gather = tables[:, decode_columns // size] * size + decode_columns % size
            decode_positions = torch.tensor([row.start for row in rows], device=device)
        prefills = []
        first = decoding
        for row in plan.rows[decoding:]:
            end = row.start + len(row.token_ids)
            columns = torch.arange(end, device=device)
            table = torch.tensor(row.block_table, device=device)
            prefills.append(
                PrefillRow(first, len(row.token_ids), row.start, table[columns // size] * size + columns % size)
            )
            first += len(row.token_ids)
        context = StepContext(
            self.kv.keys,
            self.kv.values,
            torch.tensor(slots, device=device),
            decode_gather,
            decode_positions,
            decode_columns,
            prefills,
            self.kv.workspace,
            decode_kernel=self.decode_kernel,
            lora=self.lora.batch(lora_slots) if self.lora is not None else None,
        )
        every_row = not scored and len(sampled) == len(ids)
        return _long(ids, device), _long(positions, device), _long(sampled + scored, device), every_row, context

    def _attention_backends(self) -> contextlib.AbstractContextManager[None]:
        if self.device.type == "cuda":
            return sdpa_kernel(_CUDA_SDPA_BACKENDS)
        return contextlib.nullcontext()


def _paged_copy(model: PreTrainedModel) -> PreTrainedModel:
    """`model`'s modules again, sharing its parameters and buffers (no memory), with their own config set to
    the paged attention."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    paged: PreTrainedModel = copy.deepcopy(model, shared)
    paged.config._attn_implementation_internal = PAGED_ATTENTION
    return paged


def _long(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)
