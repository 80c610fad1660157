"""The arrows that must never exist (shared/architecture.md), checked on every import statement,
including the ones inside functions.

- engine -> server, telemetry, grpc, protobuf, OpenTelemetry: the engine emits plain events and stats.
- models -> engine, server.
- clients -> src/modelserve, torch, transformers: a backend team installs the client alone.
- server/core -> the faces (server/grpc, server/openai), and one face -> another: each face maps its
  calls onto the core, and a second face is another module over the same core.
- the scheduler's side of a step (scheduler, sequences, block manager, the step plan) -> torch: a plan
  is plain data another process can execute.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "modelserve"
CLIENTS = ROOT / "clients" / "python" / "src" / "modelserve_client"

# (files, forbidden module prefixes, why)
RULES = (
    (
        SRC / "engine",
        (
            *("grpc", "grpc_health", "grpc_reflection", "google.protobuf", "opentelemetry", "modelserve_client"),
            *("modelserve.server", "modelserve.telemetry"),
        ),
        "the engine knows no gRPC, protobuf, OpenTelemetry, server or telemetry",
    ),
    (SRC / "models", ("modelserve.engine", "modelserve.server"), "models import no engine or server"),
    (CLIENTS, ("modelserve", "torch", "transformers"), "the client imports nothing of src/modelserve, nor torch"),
    (
        SRC / "server" / "core",
        ("modelserve.server.grpc", "modelserve.server.openai", "starlette"),
        "what the faces share knows none of them",
    ),
    (SRC / "server" / "grpc", ("modelserve.server.openai", "starlette"), "the gRPC faces know nothing of HTTP"),
    (SRC / "server" / "openai", ("modelserve.server.grpc",), "the OpenAI face knows nothing of the gRPC faces"),
)


# The engine core's planning half: the runner owns every tensor.
PLAN_MODULES = tuple(SRC / "engine" / f"{name}.py" for name in ("scheduler", "sequence", "block_manager", "step_plan"))


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module an import statement in `path` names, with its line; relative imports resolved."""
    parts = path.parts
    top = max(i for i, part in enumerate(parts) if part in ("modelserve", "modelserve_client"))
    package = ".".join(parts[top:-1])
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.append((node.lineno, base))
    return found


def violations(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path}:{line} imports {module}"
        for path in files
        for line, module in imported_modules(path)
        if any(module == f or module.startswith(f + ".") for f in forbidden)
    ]


def python_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.rglob("*.py")) if "/v1/" not in p.as_posix()]  # generated stubs excepted


@pytest.mark.parametrize(
    ("folder", "forbidden", "why"),
    RULES,
    ids=["engine", "models", "clients", "server-core", "server-grpc", "server-openai"],
)
def test_no_forbidden_arrow(folder: Path, forbidden: tuple[str, ...], why: str) -> None:
    files = python_files(folder)
    assert files, f"no Python files under {folder}"
    assert violations(files, forbidden) == [], why


@pytest.mark.parametrize(
    "statement",
    ["import grpc", "from grpc import aio", "from opentelemetry import trace", "from ..server import app"],
)
def test_the_check_catches_an_engine_module_that_imports_grpc(tmp_path: Path, statement: str) -> None:
    """The rule is not vacuous: a module under an engine folder that imports grpc is reported."""
    engine = tmp_path / "modelserve" / "engine"
    engine.mkdir(parents=True)
    bad = engine / "sneaky.py"
    bad.write_text(f"def f() -> None:\n    {statement}\n")
    forbidden = RULES[0][1]
    assert violations([bad], forbidden), statement


def test_the_step_plan_and_its_makers_hold_no_tensors() -> None:
    assert all(path.exists() for path in PLAN_MODULES)
    # Their own imports, and what those import from the engine: a tensor type reached through a
    # neighbour module counts too.
    engine_imports = {
        module
        for path in PLAN_MODULES
        for _, module in imported_modules(path)
        if module.startswith("modelserve.engine.")
    }
    reached = [*PLAN_MODULES, *(SRC / "engine" / f"{m.rsplit('.', 1)[1]}.py" for m in engine_imports)]
    assert violations(reached, ("torch", "transformers", "numpy")) == []


@pytest.mark.parametrize(
    ("module", "why"),
    [
        ("modelserve.engine.core_spawn", "the CLI spawns the engine core first, so its imports run beside ours"),
        ("modelserve.server.app", "the server opens its ports, and refuses a bad --model, before torch loads"),
    ],
)
def test_what_runs_before_the_model_is_read_imports_no_torch(module: str, why: str) -> None:
    code = f"import sys, {module}; print([m for m in ('torch', 'transformers') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]", why
