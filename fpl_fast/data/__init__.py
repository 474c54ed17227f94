"""fpl_fast.data."""
