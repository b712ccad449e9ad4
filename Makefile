PYTHON ?= python
PROTO_SRC := protos/textgen/v1/textgen.proto
PROTO_OUT := service/proto

.PHONY: protos check-protos

# Regenerate the committed gRPC/protobuf code in service/proto/ from protos/ (needs grpcio-tools: the dev extra).
protos:
	@tmp=$$(mktemp -d) && \
	$(PYTHON) -m grpc_tools.protoc -Iprotos --python_out=$$tmp --grpc_python_out=$$tmp --pyi_out=$$tmp $(PROTO_SRC) && \
	sed -i 's/^from textgen\.v1 import textgen_pb2 as/from . import textgen_pb2 as/' $$tmp/textgen/v1/textgen_pb2_grpc.py && \
	mv $$tmp/textgen/v1/textgen_pb2.py $$tmp/textgen/v1/textgen_pb2.pyi $$tmp/textgen/v1/textgen_pb2_grpc.py $(PROTO_OUT)/ && \
	rm -rf $$tmp && echo "generated $(PROTO_OUT)/textgen_pb2.py, textgen_pb2.pyi, textgen_pb2_grpc.py"

# Fail if the committed generated code is not what `make protos` produces now (CI runs this).
check-protos:
	@tmp=$$(mktemp -d) && \
	$(PYTHON) -m grpc_tools.protoc -Iprotos --python_out=$$tmp --grpc_python_out=$$tmp --pyi_out=$$tmp $(PROTO_SRC) && \
	sed -i 's/^from textgen\.v1 import textgen_pb2 as/from . import textgen_pb2 as/' $$tmp/textgen/v1/textgen_pb2_grpc.py && \
	status=0 && for f in textgen_pb2.py textgen_pb2.pyi textgen_pb2_grpc.py; do \
	  diff -u $(PROTO_OUT)/$$f $$tmp/textgen/v1/$$f || status=1; done; \
	rm -rf $$tmp; \
	if [ $$status -ne 0 ]; then echo "service/proto/ is stale: run 'make protos' and commit the result" >&2; exit 1; fi; \
	echo "service/proto/ is current"
