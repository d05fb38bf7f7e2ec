"""One-shot utilities (checkpoint import)."""
