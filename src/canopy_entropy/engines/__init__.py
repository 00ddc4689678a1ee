"""Sampling engines. Each engine is one module; ``get_engine`` picks one by name."""
