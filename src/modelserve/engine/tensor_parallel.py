"""Tensor parallelism: one model over N ranks, each holding its share of the attention heads and of the MLP.

The Llama family's layers are cut as Megatron-LM and vLLM cut them: the query, key and value projections
and gate/up by output rows (column-parallel: each rank computes its own heads and its slice of the MLP's
inner width), o_proj and down_proj by input columns (row-parallel: each rank's product is a partial sum),
so a layer needs one all-reduce after its attention and one after its MLP, and nothing else moves. The
embeddings, the norms and the LM head are whole on every rank (so every rank ends a step with the same
hidden states; rank 0 alone samples). Each rank's KV memory holds its own KV heads for every token, so
the block tables (rank 0's scheduler) are the same on every rank.

Rank 0 is the engine core process: it schedules, and before each forward broadcasts the step plan (plain
data, step_plan.py) to the other ranks, which run the same forward on their shards and wait for the next.
The other ranks are processes of their own (`python -m modelserve.engine.tensor_parallel`, started by rank
0 with the core's spec on stdin); torch.distributed connects them, gloo on CPU, NCCL on CUDA. Rank 0
watches them: when one dies, rank 0 exits at once, and the frontend, which watches rank 0, does what it
does when the core dies (NOT_SERVING, UNAVAILABLE to the running calls, a non-zero exit). A rank that
loses rank 0 (its broadcast fails) exits too.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from modelserve.engine.llama_forward import supports
from modelserve.process_exit import exit_now

if TYPE_CHECKING:
    from modelserve.engine.core_process import CoreSpec
    from modelserve.engine.step_plan import StepPlan

log = logging.getLogger("modelserve.engine")

CONNECT_TIMEOUT_S = 120  # ranks load the model before they meet; a slow disk is not a failure
STOP = None  # the "plan" that tells the other ranks to exit


class TensorParallel:
    """This process's place among the ranks, and the collective operations the engine uses."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum a row-parallel layer's partial products over the ranks, in place."""
        dist.all_reduce(tensor)

    def broadcast_plan(self, plan: StepPlan | None) -> None:
        """Rank 0: the step every rank runs next (None: stop)."""
        dist.broadcast_object_list([plan], src=0)

    def receive_plan(self) -> StepPlan | None:
        """The other ranks: the step rank 0 broadcasts next (None: stop)."""
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        plan: StepPlan | None = box[0]
        return plan

    def sum_int(self, value: int, device: torch.device) -> int:
        """The sum of every rank's `value` (their weights' bytes), on every rank."""
        total = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(total)
        return int(total.item())

    def broadcast_int(self, value: int) -> int:
        """Rank 0's `value` on every rank (the KV memory's block count)."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return int(box[0])


def check_shardable(config: Any, world: int) -> None:
    """ValueError naming what does not divide by `world`: heads, KV heads, the MLP's inner width."""
    sizes = {
        "num_attention_heads": int(config.num_attention_heads),
        "num_key_value_heads": int(config.num_key_value_heads),
        "intermediate_size": int(config.intermediate_size),
    }
    uneven = [f"{name} = {value}" for name, value in sizes.items() if value % world]
    if uneven:
        raise ValueError(
            f"--tensor-parallel-size {world} must divide the model's {', '.join(uneven)}: each rank holds an "
            "equal share of the heads and of the MLP"
        )


def _require_own_forward(model: Any, own_forward: bool) -> None:
    """ValueError unless `model` runs on our own Llama-family forward, the only one that is sharded."""
    if not (own_forward and supports(model)):
        raise ValueError(
            f"--tensor-parallel-size needs modelserve's own Llama-family forward; {type(model).__name__} "
            "does not run on it (a Llama, Mistral, Qwen2 or Qwen3 model, without --no-own-forward)"
        )


@torch.no_grad()
def shard(model: Any, rank: int, world: int, own_forward: bool = True) -> None:
    """Keep rank `rank`'s share of every decoder layer's linear layers, in place (the model's own modules, so
    the engine's fused and packed forward is built from the shards).

    The loader calls it on the model as from_pretrained leaves it on the CPU, its weights still views into the
    mapped checkpoint, before anything goes to the rank's device: only the shard is copied out, so a device
    holds its shard and never the whole model (the reason to shard at all). A model that would not run on our
    own forward (`own_forward` off: --no-own-forward) is refused here, before the rank loads anything more."""
    _require_own_forward(model, own_forward)
    config = model.config
    check_shardable(config, world)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj"):
            _keep_rows(getattr(attn, name), rank, world)
        _keep_columns(attn.o_proj, rank, world)
        for name in ("gate_proj", "up_proj"):
            _keep_rows(getattr(mlp, name), rank, world)
        _keep_columns(mlp.down_proj, rank, world)


def _keep_rows(linear: nn.Linear, rank: int, world: int) -> None:
    """Column-parallel: this rank's block of output features (and of the bias)."""
    size = linear.out_features // world
    rows = slice(rank * size, (rank + 1) * size)
    linear.weight = nn.Parameter(linear.weight[rows].clone(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias[rows].clone(), requires_grad=False)
    linear.out_features = size


def _keep_columns(linear: nn.Linear, rank: int, world: int) -> None:
    """Row-parallel: this rank's block of input features; the bias is added once, by rank 0."""
    size = linear.in_features // world
    columns = slice(rank * size, (rank + 1) * size)
    linear.weight = nn.Parameter(linear.weight[:, columns].clone(), requires_grad=False)
    if linear.bias is not None and rank:
        linear.bias = nn.Parameter(torch.zeros_like(linear.bias), requires_grad=False)
    linear.in_features = size


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: cuda:r on a GPU machine, the CPU otherwise."""
    return torch.device("cuda", rank) if device.type == "cuda" else device


def connect(rank: int, world: int, address: str, device: torch.device) -> TensorParallel:
    """Join the ranks (rank 0 listens at `address`, host:port): NCCL between GPUs, gloo on CPU."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{address}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=CONNECT_TIMEOUT_S),
    )
    return TensorParallel(rank, world)


class Ranks:
    """Rank 0's handle on the other ranks' processes (started with the core's spec, watched until stopped) and
    on their process group (`tp`, joined as rank 0)."""

    def __init__(self, spec: CoreSpec, world: int, address: str, device: torch.device) -> None:
        self.stopping = False
        self.processes: list[subprocess.Popen[bytes]] = []
        for rank in range(1, world):
            process = subprocess.Popen(
                [sys.executable, "-m", "modelserve.engine.tensor_parallel"], stdin=subprocess.PIPE
            )
            assert process.stdin is not None
            process.stdin.write(pickle.dumps((spec, rank, world, address)))
            process.stdin.close()
            self.processes.append(process)
        for rank, process in enumerate(self.processes, start=1):
            threading.Thread(
                target=self._watch, args=(rank, process), name=f"modelserve-tp-{rank}", daemon=True
            ).start()
        self.tp = connect(0, world, address, device)

    def _watch(self, rank: int, process: subprocess.Popen[bytes]) -> None:
        """A rank that dies ends rank 0 at once: the model is incomplete without it."""
        code = process.wait()
        if not self.stopping:
            log.error("tensor-parallel rank %d (process %d) ended (%s): the engine core stops", rank, process.pid, code)
            os._exit(1)

    def stop(self) -> None:
        """Tell the other ranks to exit, and wait for them."""
        self.stopping = True
        self.tp.broadcast_plan(STOP)
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def main() -> None:
    """A rank other than 0: load, shard, then run the steps rank 0 broadcasts until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    spec, rank, world, address = pickle.loads(sys.stdin.buffer.read())
    from modelserve.config import KV_BLOCK_TOKENS, LOG_FORMAT

    logging.basicConfig(level=spec.log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    from modelserve.engine.core_process import load_rank
    from modelserve.gc_heap import freeze_startup_heap
    from modelserve.models.quantize import weight_bytes

    runner, tp = load_rank(spec, rank, world, address)
    try:
        runner.allocate_kv(tp.broadcast_int(0), KV_BLOCK_TOKENS)
        tp.sum_int(weight_bytes(runner.model), runner.device)  # rank 0 reports the whole model's
        freeze_startup_heap(f"tensor-parallel rank {rank}")
        while (plan := tp.receive_plan()) is not STOP:
            assert plan is not None
            runner.forward_only(plan)
    except RuntimeError as exc:  # rank 0 is gone: its sockets closed under the collective
        log.warning("tensor-parallel rank %d stops: %s", rank, " ".join(str(exc).split())[:200])
        sys.exit(1)
    exit_now(0)


if __name__ == "__main__":
    main()
