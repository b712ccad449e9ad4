"""Generated protobuf and gRPC code for protos/textgen/v1/textgen.proto (make protos)."""
