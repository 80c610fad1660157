"""The gRPC faces: modelserve.v1's GenerationService and vLLM's VllmEngine, their protobuf mapping and the
request-parsing interceptor."""
