"""What every face shares: Serving (ready, start, track), parameter validation, the one refusal table,
chat templates and tool calls."""
