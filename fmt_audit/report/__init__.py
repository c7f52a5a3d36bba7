"""Reports: JSON (and its text summary), HTML."""
