"""Inspecting autograd graphs in tests."""

from __future__ import annotations

import torch


def order_dependent_sums(output: torch.Tensor) -> list[str]:
    """The backward nodes of ``output``'s graph whose gradient sums a multi-threaded CPU adds in thread-timing order:
    advanced indexing (``IndexBackward0``: ``index_put_`` with accumulate) with integer indices that repeat.
    ``index_select`` and ``F.embedding`` gather the same rows with a backward that adds in a fixed order."""
    found, seen, stack = [], set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "IndexBackward0":
            indices = [index for index in node._saved_indices if index is not None]
            if indices and not any(index.dtype == torch.bool for index in indices):
                positions = torch.stack([index.flatten() for index in torch.broadcast_tensors(*indices)], dim=-1)
                if len(torch.unique(positions, dim=0)) < len(positions):
                    found.append(f"{type(node).__name__} over {tuple(node._saved_self_sym_sizes)}")
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found
