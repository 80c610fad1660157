"""Generated protobuf and gRPC modules for modelserve.v1 (see scripts/generate_protos.py)."""
