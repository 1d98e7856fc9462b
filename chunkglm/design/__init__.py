"""Design matrices (first and second level) as pandas DataFrames."""
