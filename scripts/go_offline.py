"""Build Go programs with no network: GOPATH mode over the Go sources Debian packages in /usr/share/gocode.

A module build fetches its dependencies from the Go proxy, which this project's machines cannot reach;
Debian ships grpc-go and protobuf-go as source packages instead (golang-google-grpc-dev,
golang-google-protobuf-dev, golang-github-golang-protobuf-1-5-dev; `make test` installs them with
golang-go where it runs as root with apt-get). Built here, in GOPATH mode, against those:
- protoc-gen-go, buf.gen.yaml's Go message plugin (Debian packages its source, not the binary;
  protoc-gen-go-grpc comes as a binary, package protoc-gen-go-grpc);
- clients/go's CLI, for tests/test_go_client.py.
Online, clients/go is an ordinary module (clients/go/go.mod) and `go build ./...` needs none of this.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOCODE = Path("/usr/share/gocode")
MODULE_PATH = "modelserve/clients/go"  # clients/go/go.mod's module; buf.gen.yaml's go_package_prefix under it
# Sources the builds need, each as a file only the right version has: grpc-go 1.33 accepts golang/protobuf 1.3
# or 1.5, and only 1.5 (built on protobuf-go, with proto/proto.go) can carry the stubs protoc-gen-go writes.
NEEDED = {
    "google.golang.org/grpc": "server.go",
    "google.golang.org/protobuf": "proto/proto.go",
    "github.com/golang/protobuf (1.4 or later)": "proto/proto.go",
}
DEBIAN_PACKAGES = (
    "golang-go golang-google-grpc-dev golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev "
    "protoc-gen-go-grpc"
)


def missing() -> str | None:
    """Why Go code cannot be built here, or None when it can."""
    if shutil.which("go") is None:
        return f"no go on PATH (Debian: apt-get install {DEBIAN_PACKAGES}; make install does as root)"
    absent = [name for name, file in NEEDED.items() if not (GOCODE / "src" / name.split()[0] / file).is_file()]
    if absent:
        return f"no Debian Go sources for {', '.join(absent)} in {GOCODE} (apt-get install {DEBIAN_PACKAGES})"
    return None


def build(package: str, out: Path, work: Path) -> None:
    """`go build -o out package` in GOPATH mode: `package` is an import path, either Debian's or this
    repository's (under MODULE_PATH). `work` holds the GOPATH link to the repository and the build cache."""
    src = work / "gopath" / "src" / MODULE_PATH.split("/")[0]
    src.parent.mkdir(parents=True, exist_ok=True)
    if not src.exists():
        src.symlink_to(ROOT)  # the repository, at the root of its import path
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": f"{work / 'gopath'}{os.pathsep}{GOCODE}",
        "GOCACHE": str(work / "cache"),
        "GOFLAGS": "",
    }
    done = subprocess.run(
        ["go", "build", "-o", str(out), package], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"go build {package} failed:\n{done.stderr}")


def main() -> None:
    """make test's steps: `--needs` prints the Debian packages to install when Go code cannot be built here (or
    the Go gRPC plugin is missing), else nothing; `BIN_DIR` builds protoc-gen-go into it, or says why not."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("bin_dir", type=Path, nargs="?")
    parser.add_argument("--needs", action="store_true")
    ns = parser.parse_args()
    if ns.needs:
        if missing() is not None or shutil.which("protoc-gen-go-grpc") is None:
            print(DEBIAN_PACKAGES)
        return
    if ns.bin_dir is None:
        parser.error("give BIN_DIR or --needs")
    plugin = ns.bin_dir.resolve() / "protoc-gen-go"
    if plugin.is_file():
        return
    why = missing()
    if why is not None:
        print(f"note: protoc-gen-go not built: {why}; the Go stubs check and the Go client test will skip")
        return
    try:  # the pinned one, even where another protoc-gen-go is on PATH: the committed stubs are its output
        with tempfile.TemporaryDirectory() as work:
            build("google.golang.org/protobuf/cmd/protoc-gen-go", plugin, Path(work))
    except RuntimeError as exc:
        print(f"note: protoc-gen-go not built: {exc}; the Go stubs check will skip")
        return
    print(f"built {plugin} from Debian's protobuf-go sources")


if __name__ == "__main__":
    main()
