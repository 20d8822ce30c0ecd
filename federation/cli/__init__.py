"""federation/cli package."""
