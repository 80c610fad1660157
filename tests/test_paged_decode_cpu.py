"""The CPU paged decode kernel (engine/paged_decode_cpu.py) against the gathered SDPA path it replaces:
the same attention for every shape the engine meets (grouped-query heads, sliding windows, Gemma's
soft-cap, fp32 and bf16, rows of different lengths in scattered blocks); and a build that fails says why
and leaves nothing behind. The engine tests run both paths too: eager decode on the kernel, the
CUDA-graph path (replayed eagerly on a CPU) on the gather."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modelserve.engine import paged_decode_cpu
from modelserve.engine.attention import StepContext, Workspace, attend

BLOCK = 16


def _decode_step(
    heads: int, kv_heads: int, dim: int, lengths: list[int], dtype: torch.dtype, seed: int
) -> tuple[StepContext, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decode-only step over KV memory with random contents: each row's blocks scattered over the
    memory; returns the context and the step's query, key and value ([heads, rows, dim] and the like)."""
    generator = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-n // BLOCK) for n in lengths]
    num_blocks = 2 * sum(blocks_needed) + 1
    slots = num_blocks * BLOCK
    keys = [torch.randn(slots, kv_heads, dim, generator=generator).to(dtype)]
    values = [torch.randn(slots, kv_heads, dim, generator=generator).to(dtype)]
    order = torch.randperm(num_blocks, generator=generator).tolist()
    tables = []
    for need in blocks_needed:
        tables.append(order[:need])
        order = order[need:]
    width = max(lengths)
    columns = torch.arange(width)
    padded = torch.tensor([(t + [0] * width)[: -(-width // BLOCK)] for t in tables])
    gather = padded[:, columns // BLOCK] * BLOCK + columns % BLOCK
    positions = torch.tensor([n - 1 for n in lengths])
    slot_mapping = gather[torch.arange(len(lengths)), positions]
    workspace = Workspace(kv_heads, dim, dtype, torch.device("cpu"))
    context = StepContext(keys, values, slot_mapping, gather, positions, columns, [], workspace)
    rows = len(lengths)
    query = torch.randn(heads, rows, dim, generator=generator).to(dtype)
    key = torch.randn(kv_heads, rows, dim, generator=generator).to(dtype)
    value = torch.randn(kv_heads, rows, dim, generator=generator).to(dtype)
    return context, query, key, value


@pytest.fixture(scope="module", autouse=True)
def _kernel() -> None:
    problem = paged_decode_cpu.load()
    if problem is not None:
        pytest.skip(f"the paged decode kernel could not be built here: {problem}")


def _assert_attends_alike(in_place: torch.Tensor, gathered: torch.Tensor, dtype: torch.dtype) -> None:
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(in_place.float(), gathered.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "window", "softcap"),
    [(4, 4, None, None), (8, 2, None, None), (6, 3, 7, None), (4, 1, None, 30.0), (4, 2, 20, 50.0)],
    ids=["mha", "gqa", "gqa-window", "mqa-softcap", "window-softcap"],
)
def test_the_kernel_attends_as_the_gathered_path_does(
    heads: int, kv_heads: int, window: int | None, softcap: float | None, dtype: torch.dtype
) -> None:
    lengths = [1, 17, 40, 5, 64, 33]
    context, query, key, value = _decode_step(heads, kv_heads, 32, lengths, dtype, seed=heads * 7 + kv_heads)
    gathered = attend(context, 0, query, key, value, 0.2, window, softcap)
    context.decode_kernel = True
    _assert_attends_alike(attend(context, 0, query, key, value, 0.2, window, softcap), gathered, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(8, 4, 32), (6, 3, 64), (6, 3, 128)])
def test_one_row_splits_its_heads_over_the_threads(heads: int, kv_heads: int, dim: int, dtype: torch.dtype) -> None:
    """Over 2 threads 6 query heads in 3 kv heads split as 4 and 2, the second share starting at kv head 2."""
    context, query, key, value = _decode_step(heads, kv_heads, dim, [300], dtype, seed=11)
    gathered = attend(context, 0, query, key, value, 0.2, None)
    context.decode_kernel = True
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            _assert_attends_alike(attend(context, 0, query, key, value, 0.2, None), gathered, dtype)
    finally:
        torch.set_num_threads(threads)


def test_the_default_scale_is_one_over_the_root_of_the_head_dim() -> None:
    context, query, key, value = _decode_step(4, 2, 64, [9, 30], torch.float32, seed=3)
    gathered = attend(context, 0, query, key, value, None, None)
    context.decode_kernel = True
    torch.testing.assert_close(attend(context, 0, query, key, value, None, None), gathered, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 128, 80])
def test_every_head_dim_and_scores_far_apart(dim: int, dtype: torch.dtype) -> None:
    """64 and 128 are compiled in (and, on an AVX-512 CPU, take the vector intrinsics), others run the
    general loop; a scale of 4 spreads the scores over hundreds, so most of the kernel's exponentials
    underflow (its own polynomial, not std::exp)."""
    context, query, key, value = _decode_step(4, 2, dim, [1, 50, 130], dtype, seed=dim)
    gathered = attend(context, 0, query, key, value, 4.0, None)
    context.decode_kernel = True
    _assert_attends_alike(attend(context, 0, query, key, value, 4.0, None), gathered, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "window", "softcap"),
    [(12, 12, None, None), (6, 3, 9, None), (7, 1, None, 30.0)],
    ids=["gpt2-heads", "gqa-window", "mqa-softcap"],
)
def test_the_compiled_in_head_dims_attend_as_the_gathered_path_does(
    heads: int, kv_heads: int, window: int | None, softcap: float | None, dim: int, dtype: torch.dtype
) -> None:
    """Head dims 64 and 128, which an AVX-512 CPU computes with vector intrinsics that take query heads four
    at a time: 12 heads (three fours), 6 and 7 (a four and the rest one by one)."""
    lengths = [1, 17, 40, 5, 64, 33]
    context, query, key, value = _decode_step(heads, kv_heads, dim, lengths, dtype, seed=heads * 5 + kv_heads)
    gathered = attend(context, 0, query, key, value, None, window, softcap)
    context.decode_kernel = True
    _assert_attends_alike(attend(context, 0, query, key, value, None, window, softcap), gathered, dtype)


def test_a_failed_build_says_why_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELSERVE_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails at once
    with pytest.raises(RuntimeError, match="the C\\+\\+ compiler failed"):
        paged_decode_cpu.build()
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(RuntimeError, match="could not run the C\\+\\+ compiler"):
        paged_decode_cpu.build()
    assert list(tmp_path.iterdir()) == []
