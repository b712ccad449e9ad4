"""``textgen serve --workers N --shards M``: gRPC front ends and engine shards in separate processes.

* :mod:`.supervisor`: the parent (no gRPC, no model): starts, watches and stops the children, serves /metrics;
* :mod:`.frontend`: a front end's process: a gRPC server whose core is a :class:`.remote.RemoteCore`;
* :mod:`.remote`: the :class:`~textgen.service.interface.Core` that forwards every call to a shard;
* :mod:`.shard`: an engine shard's process: a :class:`~textgen.service.core.TextgenCore` behind ZeroMQ;
* :mod:`.wire`: the messages between them, declared once;
* :mod:`.child`: what every child shares with the parent (start errors, the parent's death, shard deaths).

Nothing outside this package imports it but the command line.
"""
