"""fpl_fast.privacy."""
