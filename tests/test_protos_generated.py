"""The committed generated code is exactly what `make proto` makes from protos/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("generate_protos", ROOT / "scripts" / "generate_protos.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    """modelserve.v1's package (vLLM's comes generated in smg-grpc-proto, pinned)."""
    generator = _load_generator()
    generated = generator.generate(tmp_path)
    src = ROOT / "clients" / "python" / "src"
    committed = [p for package, _ in generator.PACKAGES.values() for p in (src / package).iterdir() if p.is_file()]
    names = sorted(str(p.relative_to(tmp_path)) for p in generated)
    assert names == sorted(str(p.relative_to(src)) for p in committed), "run `make proto`"
    assert any(name.startswith("modelserve_client/v1/") for name in names), "modelserve.v1's stubs"
    for path in generated:
        name = path.relative_to(tmp_path)
        assert (src / name).read_bytes() == path.read_bytes(), f"{name} is out of date with protos/: run `make proto`"


def test_client_imports_without_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, modelserve_client, modelserve_client.cli\n"
        "bad = [m for m in ('torch', 'transformers', 'modelserve') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
