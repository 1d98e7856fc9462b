"""Input/output: NIfTI streaming, the cohort store, BIDS discovery, conversion."""
