"""OpenTelemetry for modelserve: set up once, observe engine stats and request outcomes."""
