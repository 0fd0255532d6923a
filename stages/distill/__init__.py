"""Stage 2: train students against cached (or live) teacher targets (loader, sources, run)."""
