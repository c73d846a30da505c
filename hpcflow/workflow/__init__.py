"""Running workflows on the cluster: node-side execution, plan execution, the script API."""
