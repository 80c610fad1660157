"""Generate the Python gRPC code from protos/ into the client package.

One command (`make proto`, which runs this script) is the only way the generated files under
clients/python/src/modelserve_client/ are made; tests/test_protos_generated.py runs it into a
temporary folder and fails when the committed files differ.

Our contract, protos/modelserve/v1 -> modelserve_client.v1 (PACKAGES). vLLM's VllmEngine, which the server
also serves, is not generated here: its maintained definitions and Python code come from PyPI's
smg-grpc-proto (pinned in pyproject.toml), the package the smg router itself is built from.

The proto files live at buf's package layout, but the Python modules must not be named after their
proto packages: `modelserve.v1` would collide with the server's own `modelserve` package. protoc's
virtual proto path (`-Imodelserve_client/v1=protos/modelserve/v1`) places them in the client package
with self-consistent imports; the wire name (`modelserve.v1.GenerationService`) is unchanged.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
DEFAULT_OUT = ROOT / "clients" / "python" / "src"
# proto folder under protos/ -> (Python package folder under the output root, what it holds)
PACKAGES = {
    "modelserve/v1": ("modelserve_client/v1", "modelserve.v1"),
}


def generate(out_root: Path) -> list[Path]:
    """Run protoc over every proto file of every package; return the files written."""
    written: list[Path] = []
    for proto_folder, (package, holds) in PACKAGES.items():
        proto_dir = PROTO_ROOT / proto_folder
        protos = sorted(proto_dir.glob("*.proto"))
        if not protos:
            raise SystemExit(f"no .proto files under {proto_dir}")
        package_dir = out_root / package
        package_dir.mkdir(parents=True, exist_ok=True)
        args = [
            "grpc_tools.protoc",
            f"--proto_path={package}={proto_dir}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            *(str(p) for p in protos),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto_dir}")
        init = package_dir / "__init__.py"
        init.write_text(f'"""Generated protobuf and gRPC modules for {holds} (see scripts/generate_protos.py)."""\n')
        written += sorted(p for p in package_dir.iterdir() if p.is_file())
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output root (default: the client package)")
    ns = parser.parse_args()
    for path in generate(ns.out):
        print(path.relative_to(ns.out))


if __name__ == "__main__":
    sys.exit(main())
