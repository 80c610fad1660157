"""modelserve: serve Hugging Face causal language models over gRPC, streaming tokens."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("modelserve")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"
