"""Code that runs in the user's script: :func:`~hpcflow.client.client.connect` and the
:class:`~hpcflow.client.client.Client`, and the lazy workflow API on top of it
(:mod:`.flow`: handles, submit, gather).  It talks to a node only over ``hpcflow.rpc``."""
