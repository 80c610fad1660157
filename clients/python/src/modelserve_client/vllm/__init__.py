"""Generated protobuf and gRPC modules for vLLM's vllm.grpc.engine (the VllmEngine service) (see scripts/generate_protos.py)."""
