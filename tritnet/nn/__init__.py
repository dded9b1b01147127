"""Modules: the tree, and the ternary layers built on integer state."""

from .module import Module, ModuleList, Parameter, Sequential
from .ternary import TernaryLinear, TernaryModule

__all__ = ["Module", "ModuleList", "Parameter", "Sequential", "TernaryLinear", "TernaryModule"]
