"""The calls ``mmrl.train.step.contrastive_step`` makes of a DeepSpeed engine, on a plain module:
forward, ``backward(loss, scale_wrt_gas)`` and ``step()`` (a no-op: tests read the gradients, or
call :meth:`EagerEngine.update` for an SGD step when they want the weights to move)."""
import torch


class EagerEngine:
    def __init__(self, module, lr: float = 0.1):
        self.module = module
        self.opt = torch.optim.SGD(module.parameters(), lr=lr)

    def __call__(self, images, texts):
        return self.module(images, texts)

    def backward(self, loss, scale_wrt_gas=True):
        loss.backward()

    def step(self):
        pass

    def update(self):
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
