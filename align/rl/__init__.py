"""GRPO math as pure functions on tensors: advantages (`advantages.py`) and policy losses (`losses.py`)."""
