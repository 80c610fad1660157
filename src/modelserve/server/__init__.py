"""The gRPC face: servicer, validation, lifecycle. Translates between protos and engine types."""
