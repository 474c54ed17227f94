"""fpl_fast.methods."""
