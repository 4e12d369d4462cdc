"""Low-level compute pieces for the engine's fast paths (4-bit weight-only linear layers, decode attention)."""
