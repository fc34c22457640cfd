"""act package."""
