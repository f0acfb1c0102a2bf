"""``OpDtypes``: a torch function mode recording the dtypes each torch function is called with
(which precision a layer's maths really runs in, e.g. under autocast)."""
import torch
from torch.overrides import TorchFunctionMode


class OpDtypes(TorchFunctionMode):
    """``seen[name]``: the set of tensor dtypes passed to the torch function ``name``."""

    def __init__(self):
        super().__init__()
        self.seen: dict[str, set] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        self.seen.setdefault(name, set()).update(t.dtype for t in tensors)
        return func(*args, **kwargs)
