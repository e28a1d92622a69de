"""Built-in tasks: small, deterministic data sets that need no download."""
