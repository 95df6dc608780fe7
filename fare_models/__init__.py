"""fare-moe model side: routing surgery, phi profiles and the ``fare_moe`` lm-eval model."""

__all__ = ["surgery", "profile", "lm"]
