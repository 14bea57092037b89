"""Seconds spent inside torch module forward calls, for the benchmarks' network / non-network split.

Global forward hooks time the outermost module call only (a network's submodules run inside it), so ``seconds`` is
the time in network forward passes and everything else a pipeline does is its overhead.
"""

from __future__ import annotations

import time


class ForwardTimer:
    """Install once per process; ``seconds`` accumulates, ``calls`` lists (network class, input shape) per call."""

    def __init__(self) -> None:
        import torch

        self.seconds = 0.0
        self.calls: list[tuple[str, tuple[int, ...]]] = []
        self._depth = 0
        self._t0 = 0.0
        self._handles = [torch.nn.modules.module.register_module_forward_pre_hook(self._pre),
                         torch.nn.modules.module.register_module_forward_hook(self._post)]

    def _pre(self, module, args) -> None:
        if self._depth == 0:
            self.calls.append((type(module).__name__, tuple(args[0].shape)))
            self._t0 = time.perf_counter()
        self._depth += 1

    def _post(self, module, args, output) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.seconds += time.perf_counter() - self._t0

    def remove(self) -> None:
        """Uninstall the hooks (later forward calls are not timed)."""
        for h in self._handles:
            h.remove()
        self._handles = []
