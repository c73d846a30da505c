"""Code that runs only in the node daemon: the Node that wires its parts, the RPC
surface, dataset operations and put rules, and the workflow machinery (a node's
share of an execution, the worker, the initiator's planning and execution, flow
clean-up).  Nothing here runs in a user's script."""
