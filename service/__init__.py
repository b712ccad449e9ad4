"""textgen.service: the torch-free runtime, the gRPC service, the scoring job and the CLI."""
