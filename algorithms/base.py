"""The registry of algorithms: `build_graph(job: JobConfig) -> Graph | Plan` by name.

Register with `@register_algorithm("name")`, or reference a function from YAML by import path
(`algorithm.name: my_package.my_module:build_graph`).
"""
from __future__ import annotations

from typing import Any, Callable

from core.graph import Graph, Plan
from core.registry import Registry

GraphBuilder = Callable[[Any], "Graph | Plan"]
ALGORITHMS: Registry[GraphBuilder] = Registry("algorithm", importable=True)
register_algorithm = ALGORITHMS.register
get_algorithm = ALGORITHMS.get
"""A registered graph builder, or one imported from "package.module:function"."""
