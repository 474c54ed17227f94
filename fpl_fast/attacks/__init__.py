"""fpl_fast.attacks."""
