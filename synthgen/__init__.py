"""synthgen package."""
