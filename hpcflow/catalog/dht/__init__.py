"""The Kademlia DHT catalog (``--catalog dht``): see :mod:`.catalog` for the design.

One module per concept: :mod:`.keys` (what is stored under which key),
:mod:`.values` (the signed, versioned envelopes and how replicas merge them),
:mod:`.storage` (kademlia's swappable ``IStorage``, version-aware), :mod:`.facade`
(kademlia's asyncio loop in one thread behind a synchronous, gevent-friendly API)
and :mod:`.catalog` (the :class:`~hpcflow.catalog.base.Catalog` itself).
"""
