"""xdl-bridge."""
