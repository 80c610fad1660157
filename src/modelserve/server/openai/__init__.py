"""The OpenAI-compatible HTTP face: the Starlette app, request and response shapes, and the chat page."""
