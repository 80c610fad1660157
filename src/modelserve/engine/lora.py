"""Many LoRA adapters in one batch: resident slots, and each token's adapter product in the same matmuls.

Up to `max_loras` adapters are resident at once, each in a slot (1..max_loras; 0 is the bare base). For each
of a layer's fused projections (qkv, o, gate_up, down; llama_forward.py) every slot's A matrices sit side by
side in one [in, parts * slots * r] tensor and its B matrices (scaled) in one [parts * slots * r, out]
tensor, block by block, zero where an adapter has a smaller rank or leaves a module alone. A step's tokens
then get their adapters' products as

    ((x @ A) * mask) @ B

where `mask` keeps, for each token, the columns of its own slot: rows of different adapters and rows of
none share the step's matmuls, as punica's and S-LoRA's gathered kernels do, without a loop over adapters
and without gathering a weight per token (which would copy in x r floats per token and projection). A
step with no adapted row skips all of it.

The bookkeeping (which adapter is in which slot, and who uses it) is the scheduler's (lora_slots.py);
LoraWeights holds the tensors, in the runner. Written here: PEFT merges or loops per adapter, and vLLM's
punica kernels are CUDA/Triton only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelserve.models.lora import module_shapes

# A layer's fused projections, as llama_forward.py computes them, and the modules each concatenates.
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
LoraTensors = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, module) -> (A [r, in], B [out, r])


@dataclass
class LoraBatch:
    """One step's view of the slots: per token, the columns of its own adapter, for each group's width."""

    weights: LoraWeights
    masks: dict[int, torch.Tensor]  # parts -> [tokens, parts * slots * r]

    def delta(self, group: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The adapters' product for `group` of `layer` on its input `x` [tokens, in]: [tokens, out]."""
        a, b = self.weights.a[group][layer], self.weights.b[group][layer]
        return ((x @ a) * self.masks[len(GROUPS[group])]) @ b


class LoraWeights:
    """Every slot's A and B, per layer and fused projection, on the model's device and in its dtype."""

    def __init__(self, config: object, max_loras: int, max_rank: int, dtype: torch.dtype, device: torch.device):
        self.slots, self.rank = max_loras, max_rank
        self.dtype, self.device = dtype, device
        self.shapes = module_shapes(config)
        layers = int(getattr(config, "num_hidden_layers"))  # noqa: B009 (any config object)
        self.a: dict[str, list[torch.Tensor]] = {}
        self.b: dict[str, list[torch.Tensor]] = {}
        for group, modules in GROUPS.items():
            width = len(modules) * max_loras * max_rank
            fan_in = self.shapes[modules[0]][0]
            fan_out = sum(self.shapes[m][1] for m in modules)
            self.a[group] = [torch.zeros(fan_in, width, dtype=dtype, device=device) for _ in range(layers)]
            self.b[group] = [torch.zeros(width, fan_out, dtype=dtype, device=device) for _ in range(layers)]
        self._column_slots = {
            parts: torch.arange(parts * max_loras, device=device)
            .remainder(max_loras)
            .add(1)
            .repeat_interleave(max_rank)
            for parts in {len(m) for m in GROUPS.values()}
        }

    def _columns(self, part: int, slot: int) -> slice:
        start = (part * self.slots + slot - 1) * self.rank
        return slice(start, start + self.rank)

    @torch.inference_mode()
    def load(self, slot: int, tensors: LoraTensors) -> None:
        """Put an adapter's weights in `slot`, replacing what was there (zeros where it adapts nothing)."""
        for group, modules in GROUPS.items():
            for layer, (a, b) in enumerate(zip(self.a[group], self.b[group], strict=True)):
                offset = 0
                for part, module in enumerate(modules):
                    columns, out = self._columns(part, slot), self.shapes[module][1]
                    a[:, columns] = 0
                    b[columns, :] = 0
                    pair = tensors.get((layer, module))
                    if pair is not None:
                        rank = pair[0].shape[0]
                        live = slice(columns.start, columns.start + rank)
                        a[:, live] = pair[0].t().to(self.device, self.dtype)
                        b[live, offset : offset + out] = pair[1].t().to(self.device, self.dtype)
                    offset += out

    def batch(self, token_slots: list[int]) -> LoraBatch | None:
        """The step's masks for tokens in these slots (0: none); None when no token has an adapter."""
        if not any(token_slots):
            return None
        slots = torch.tensor(token_slots, device=self.device)[:, None]
        masks = {parts: (columns[None, :] == slots).to(self.dtype) for parts, columns in self._column_slots.items()}
        return LoraBatch(self, masks)
