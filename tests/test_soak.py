"""Soak and overload at small scale: the scenarios of bench/soak.py (one implementation), asserting
their pass conditions. Speed is measured by the benchmark (`make soak`), not asserted here, except
that a refusal must come back well before an admitted request does."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from bench import soak
from bench.harness import log_errors, model_dir


@pytest.fixture(scope="module")
def soak_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_dir(soak.MODEL, tmp_path_factory.mktemp("soak-model"))


def _failures(report: dict[str, Any]) -> str:
    """The checks that failed, for the assertion message."""
    return "\n".join(f"{name}: {c['detail']}" for name, c in report["checks"].items() if not c["ok"])


def test_soak_small(soak_model: Path, tmp_path: Path) -> None:
    cfg = dataclasses.replace(soak.QUICK_SOAK, requests=200, warmup=40)
    report = asyncio.run(soak.soak_scenario(soak_model, cfg, tmp_path))

    assert all(c["ok"] for c in report["checks"].values()), _failures(report)
    # Every way of ending early was exercised, and what was not cut short completed correctly.
    for status in ("completed", "cancelled", "disconnected", "crashed"):
        assert report[status] > 0, f"no stream ended {status}: the mix did not exercise it"
    assert report["deadline_exceeded"] > 0
    assert report["error"] == 0 and report["wrong_outputs"] == 0
    normal = report["by_kind"]["normal"]
    assert normal.get("completed", 0) == sum(normal.values())
    # Nothing leaked: no rows, no queued tokens, the KV cache as it was before; nothing logged as an error.
    assert report["leaked_rows"] == 0
    assert report["waiting_tokens_after"] == 0
    assert report["kv_tokens_after"] == report["kv_tokens_before"]
    assert report["server_log_errors"] == 0
    assert report["server_exit_code"] == 0


def test_overload_small(soak_model: Path, tmp_path: Path) -> None:
    report = asyncio.run(soak.overload_scenario(soak_model, soak.QUICK_OVERLOAD, tmp_path))

    assert all(c["ok"] for c in report["checks"].values()), _failures(report)
    # Refused at once with RESOURCE_EXHAUSTED and gRPC's retry hint; everything admitted completed correctly.
    assert report["rejected"] > 0
    assert report["rejections_with_pushback"] == report["rejected"]
    assert report["pushback_ms_min"] >= 1
    assert report["admitted"] > 0 and report["admitted_completed_correct"] == report["admitted"]
    assert report["other_errors"] == 0 and report["wrong_outputs"] == 0
    assert report["rejection_latency_p99_ms"] < report["admitted_latency_p50_ms"]
    assert report["leaked_rows"] == 0 and report["kv_tokens_after"] == report["kv_tokens_before"]
    limit = soak.QUICK_OVERLOAD.max_waiting_requests
    assert report["queue_probe_admitted"] == f"{limit}/{limit}"  # the queue's count came back to zero


def test_log_errors_counts_what_is_logged_at_error_and_uncaught_tracebacks() -> None:
    """The soak's "no ERROR lines" check fails on these; a caller's cancel logged below ERROR is not one."""
    log = """\
2026-11-30 04:53:41,000 INFO modelserve: listening on 127.0.0.1:5000
2026-11-30 04:53:41,553 WARNING modelserve.server.grpc.servicer: request 7 cancelled by the caller
Traceback (most recent call last):
  File "servicer.py", line 1, in Generate
asyncio.exceptions.CancelledError
2026-11-30 04:53:42,001 ERROR opentelemetry.context: Failed to detach context
Traceback (most recent call last):
  File "contextvars_context.py", line 40, in detach
GeneratorExit

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
ValueError: <Token ...> was created in a different Context
Exception in thread modelserve-load:
Traceback (most recent call last):
RuntimeError: boom
E1130 04:53:43.000000 1234 chttp2_transport.cc:1] an error of gRPC core itself
I1130 04:53:43.000000 1234 chttp2_transport.cc:1] information only
2026-11-30 04:53:44,000 CRITICAL modelserve: server failed
"""
    assert log_errors(log) == [
        "2026-11-30 04:53:42,001 ERROR opentelemetry.context: Failed to detach context",
        "Traceback (most recent call last):",  # the thread's: no record carries it
        "E1130 04:53:43.000000 1234 chttp2_transport.cc:1] an error of gRPC core itself",
        "2026-11-30 04:53:44,000 CRITICAL modelserve: server failed",
    ]
    assert log_errors("2026-11-30 04:53:41,000 INFO modelserve: serving\n") == []
