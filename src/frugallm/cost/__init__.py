"""Cost models: pure functions of a ``ModelConfig`` (parameters, FLOPs, memory, hardware, dollars)."""
