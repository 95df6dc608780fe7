"""fare-moe model side: MoE adapters, routing surgery and the ``fare_moe`` lm-eval model."""

__all__ = ["adapters", "surgery", "tiny"]
