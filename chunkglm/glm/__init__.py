"""GLMs: first level (and, later, second level)."""
