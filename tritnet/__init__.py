"""tritnet: train true-ternary neural networks with packed trits and integer state.

The public surface: `tensor`, `Tensor`, `no_grad`, the functional ops in `tritnet.functional`,
modules in `tritnet.nn`, the integer optimiser in `tritnet.optim`, the device in `tritnet.backend`.
"""

__version__ = "0.1.0"

from . import backend
from .autograd import Function, Tensor, enable_grad, is_grad_enabled, no_grad, tensor
from .errors import TritnetError

__all__ = ["Function", "Tensor", "TritnetError", "backend", "enable_grad", "is_grad_enabled",
           "no_grad", "tensor", "__version__"]
