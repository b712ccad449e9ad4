"""The HTTP front door (docs/http.md): an OpenAI-compatible API, textgen's own JSON routes, health, OpenAPI and
a playground page, served by uvicorn on the server's event loop next to gRPC, around the same
:class:`~textgen.service.interface.Core` (the seam: it holds nothing else of the engine side)."""
