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
    generated = _load_generator().generate(tmp_path)
    committed_dir = ROOT / "clients" / "python" / "src" / "modelserve_client" / "v1"
    names = sorted(p.name for p in generated)
    assert names == sorted(p.name for p in committed_dir.iterdir() if p.is_file()), "run `make proto`"
    for path in generated:
        committed = (committed_dir / path.name).read_bytes()
        assert committed == path.read_bytes(), f"{path.name} is out of date with protos/: run `make proto`"


def test_client_imports_without_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, modelserve_client, modelserve_client.cli\n"
        "bad = [m for m in ('torch', 'transformers', 'modelserve') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
