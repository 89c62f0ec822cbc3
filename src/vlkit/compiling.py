"""``torch.compile`` with an eager fallback, shared by training (``vlkit.train.compile``) and the decoder LM's compiled
decoding steps (``DecoderLM.compile_decoding``): whether inductor finds its C++ compiler, and a call that runs the
compiled function until it fails once, then the eager one for good.
"""

from __future__ import annotations

import functools
import shutil
import warnings
from collections.abc import Callable
from typing import Any


@functools.cache
def compiler_present() -> bool:
    """Inductor on CPU builds C++: whether the compiler it is configured with (g++ by default) is on the PATH."""
    from torch._inductor import config

    names = [name for name in config.cpp.cxx if name]
    return any(shutil.which(name) for name in names)


def compiled_or_eager(
    compiled: Callable[..., Any], eager: Callable[..., Any], state: dict[str, bool], failure: str, then: str
) -> Callable[..., Any]:
    """``compiled(...)`` until a call raises, then ``eager(...)``: that call too (a genuine error in the function
    raises again from it) and every later one of whatever shares ``state`` (``state["failed"]``). The failure warns
    once: "<failure> (<error>); <then>"."""

    def call(*args: Any, **kwargs: Any) -> Any:
        if not state["failed"]:
            try:
                return compiled(*args, **kwargs)
            except Exception as error:  # no working compiler, an unsupported op
                state["failed"] = True
                line = str(error).splitlines()[0] if str(error) else ""
                warnings.warn(f"{failure} ({type(error).__name__}: {line}); {then}", stacklevel=2)
        return eager(*args, **kwargs)

    return call
