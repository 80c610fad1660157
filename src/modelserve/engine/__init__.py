"""The continuous-batching engine. It knows no gRPC, protobuf or OpenTelemetry."""
