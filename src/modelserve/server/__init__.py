"""The frontend process: the three faces (grpc/: modelserve.v1 and vLLM's gRPC; openai/: the OpenAI HTTP API
and chat page) over what they share (core/), started, drained (lifecycle.py) and secured (security.py) by
app.py."""
