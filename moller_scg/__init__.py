"""moller_scg: full-batch training with Møller's Scaled Conjugate Gradient (SCG) in PyTorch."""

from moller_scg.scg import SCG, SCGTrace

__all__ = ["SCG", "SCGTrace", "__version__"]
__version__ = "0.1.0"
