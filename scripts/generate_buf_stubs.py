"""Generate the stubs for other languages (buf.gen.yaml: TypeScript for Node, Go) from protos/ with buf.

`make proto` runs this after the Python stubs. buf and the TypeScript plugin (ts-proto) come from
clients/node's pinned devDependencies (`npm ci` in clients/node; `make install` runs it where npm
exists), so it works offline. The Go plugins (protoc-gen-go, protoc-gen-go-grpc) are Go binaries
on PATH or in this Python's bin folder (make install puts them there from Debian's packages: see
go_offline.py); a plugin that is not installed is skipped with a note, so a machine without Go
still regenerates the TypeScript.

tests/test_node_client.py and tests/test_go_client.py run this into a temporary folder and fail
when the committed clients/node/src/gen or clients/go/gen differs from what it makes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]  # PyYAML: installed with transformers, a server dependency

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "buf.gen.yaml"
BUF = ROOT / "clients" / "node" / "node_modules" / ".bin" / "buf"


def search_path() -> str:
    """PATH with this Python's bin folder first: make install builds protoc-gen-go into .venv/bin."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def plugin_found(plugin: dict[str, Any]) -> bool:
    """A local plugin given as a path (relative to the repository root) or a name on search_path()."""
    local = plugin["local"]
    program = local[0] if isinstance(local, list) else local
    return (ROOT / program).is_file() if "/" in program else shutil.which(program, path=search_path()) is not None


def generate(out_root: Path) -> tuple[list[Path], list[str]]:
    """Run buf generate with buf.gen.yaml's installed plugins, their `out` folders under out_root.
    Returns the files written and the plugins skipped because they are not installed."""
    if not BUF.is_file():
        raise SystemExit(f"{BUF.relative_to(ROOT)} is missing: run `npm ci` in clients/node (make install does)")
    template = yaml.safe_load(TEMPLATE.read_text())
    plugins = template["plugins"]
    template["plugins"] = [p for p in plugins if plugin_found(p)]
    skipped = [str(p["local"]) for p in plugins if not plugin_found(p)]
    if not template["plugins"]:
        raise SystemExit("none of buf.gen.yaml's plugins is installed")
    out_root.mkdir(parents=True, exist_ok=True)
    command = [str(BUF), "generate", "--template", json.dumps(template), "--output", str(out_root)]
    env = {**os.environ, "PATH": search_path()}
    if subprocess.run(command, cwd=ROOT, env=env, check=False).returncode != 0:
        raise SystemExit("buf generate failed (its error is above)")
    outs = {out_root / p["out"] for p in template["plugins"]}
    return sorted(f for out in outs for f in out.rglob("*") if f.is_file()), skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository)")
    ns = parser.parse_args()
    written, skipped = generate(ns.out.resolve())
    for path in written:
        print(path.relative_to(ns.out.resolve()))
    for plugin in skipped:
        print(f"note: {plugin} is not installed: its stubs were not generated (see buf.gen.yaml)", file=sys.stderr)


if __name__ == "__main__":
    main()
