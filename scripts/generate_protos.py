"""Generate the Python gRPC code from protos/ into the client package.

One command (`make proto`, which runs this script) is the only way the files under
clients/python/src/modelserve_client/v1/ are made; tests/test_protos_generated.py
runs it into a temporary folder and fails when the committed files differ.

The proto files live at protos/modelserve/v1/ (buf's package layout), but the
Python modules must not be named `modelserve.v1`: that would collide with the
server's own `modelserve` package. protoc's virtual proto path
(`-Imodelserve_client/v1=protos/modelserve/v1`) places them at
`modelserve_client.v1` with self-consistent imports, and the wire names
(`modelserve.v1.GenerationService`) are unchanged.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos" / "modelserve" / "v1"
DEFAULT_OUT = ROOT / "clients" / "python" / "src"
VIRTUAL_PACKAGE = "modelserve_client/v1"


def generate(out_root: Path) -> list[Path]:
    """Run protoc over every proto file; return the files written."""
    protos = sorted(PROTO_DIR.glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_DIR}")
    package_dir = out_root / VIRTUAL_PACKAGE
    package_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={VIRTUAL_PACKAGE}={PROTO_DIR}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(p) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    init = package_dir / "__init__.py"
    init.write_text('"""Generated protobuf and gRPC modules for modelserve.v1 (see scripts/generate_protos.py)."""\n')
    return sorted(p for p in package_dir.iterdir() if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output root (default: the client package)")
    ns = parser.parse_args()
    for path in generate(ns.out):
        print(path.relative_to(ns.out))


if __name__ == "__main__":
    sys.exit(main())
