"""Public pooling API: ``from mmrl.pooling import ggem, GGeM, build_pool``."""
from .layers import *  # noqa: F401,F403
from .layers import __all__  # noqa: F401
