"""taxonomy package."""
