"""A user-defined tool, outside the packages: unit conversion the model can call.

A tool is a typed function with a docstring (its JSON schema, what a chat template shows the
model, comes from both); it returns the observation as a string. Whatever it raises reaches the
model as an error observation, and the rollout counts it (tools/error). Select it by import
path next to the built-in ones, from the repository root:

    torchrun --nproc_per_node=2 -m launch.train --config configs/grpo.yaml \\
        'rollout.tools.names=[calculator,examples.unit_convert:convert]'
"""
from __future__ import annotations

FACTORS = {("km", "mi"): 0.621371, ("mi", "km"): 1.609344, ("kg", "lb"): 2.204623,
           ("lb", "kg"): 0.453592, ("m", "ft"): 3.280840, ("ft", "m"): 0.3048}


def convert(value: float, unit_from: str, unit_to: str) -> str:
    """Convert a quantity between units of length or mass.

    Args:
        value: the quantity, in unit_from
        unit_from: one of km, mi, kg, lb, m, ft
        unit_to: the unit wanted
    """
    factor = FACTORS.get((unit_from, unit_to))
    if factor is None:
        raise ValueError(f"cannot convert {unit_from} to {unit_to}; pairs: {sorted(FACTORS)}")
    return f"{float(value) * factor:.6g} {unit_to}"
