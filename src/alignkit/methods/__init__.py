"""Registration methods users pick by name; all share ``register(fixed, moving, ...)``."""
