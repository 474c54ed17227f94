"""fpl_fast.federated."""
