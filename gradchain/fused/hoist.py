"""Scalar hoisting: a graph pass that computes a segment's 0-d math once per step, not per element.

Hyperparameters and step counts reach a compiled segment as 0-d tensors, so the bias corrections,
step sizes and decay factors of a chain (``1 - b2 ** t``, ``-lr / bc1``, ...) are tensor
expressions in the traced graph. Inductor inlines such expressions into the consumer kernel, where
the generated loop re-evaluates them (``pow``, ``sqrt`` in float64) for every vector of elements:
on a 32M-element AdamW step that doubles the time of a memory-bound kernel. This pass finds every
0-d value that depends only on unmutated 0-d inputs and routes the ones that feed per-element work
through ``gradchain::hoist``, an opaque identity op, so that the compiler computes them in a small
kernel of their own and the per-element kernel only loads the results.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch._inductor.config as inductor_config
from torch import Tensor, fx


def hoist(xs: list[Tensor]) -> list[Tensor]:
    """Identity on a list of small tensors, opaque to the compiler (a barrier against inlining)."""
    return [x.clone() for x in xs]


# defined with torch.library.Library, not custom_op: the op runs once per compiled step, and
# custom_op's Python autograd and profiling wrappers cost more than the clones themselves
_LIB = torch.library.Library("gradchain", "DEF")
_LIB.define("hoist(Tensor[] xs) -> Tensor[]")
_LIB.impl("hoist", hoist, "CompositeExplicitAutograd")


@torch.library.register_fake("gradchain::hoist", lib=_LIB)
def _(xs: list[Tensor]) -> list[Tensor]:
    return [torch.empty_like(x) for x in xs]


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ipow,
                      operator.setitem, operator.ifloordiv, operator.imod}


def _name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", "")


def _mutated_args(node: fx.Node) -> list[Any]:
    """The arguments a node writes in place (conservatively: the first argument of any ``*_`` op)."""
    if node.op not in ("call_function", "call_method"):
        return []
    name = _name(node)
    inplace = node.target in _INPLACE_OPERATORS or (name.endswith("_") and not name.endswith("__"))
    out = [node.kwargs["out"]] if "out" in node.kwargs else []
    return ([node.args[0]] if inplace and node.args else []) + out


def _is_scalar_value(value: Any) -> bool:
    return isinstance(value, Tensor) and value.dim() == 0


def _nodes_in(arg: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.map_arg(arg, found.append)
    return found


def _value(node: fx.Node) -> Any:
    return node.meta.get("example_value", node.meta.get("val"))


def _storage(t: Tensor) -> Any:
    from torch.multiprocessing.reductions import StorageWeakRef

    return StorageWeakRef(t.untyped_storage())


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return [value] if isinstance(value, Tensor) else []


def _written_storages(graph: fx.Graph) -> set:
    """The storages of everything the graph writes in place (a view's write reaches its base)."""
    return {_storage(t) for node in graph.nodes for a in _mutated_args(node) for n in _nodes_in(a)
            for t in _tensors(_value(n))}


def hoist_scalars(gm: fx.GraphModule) -> int:
    """Route the graph's computed 0-d values into per-element work through one ``hoist`` call.

    A node is scalar when its value is a 0-d tensor whose storage nothing in the graph writes, it
    writes nothing, and every node it reads is scalar or such a 0-d input. Returns the number of
    values hoisted.
    """
    graph = gm.graph
    written = _written_storages(graph)
    scalar: set[fx.Node] = set()
    for node in graph.nodes:
        value = _value(node)
        if not _is_scalar_value(value) or _storage(value) in written:
            continue
        if node.op == "placeholder" or (node.op in ("call_function", "call_method") and not _mutated_args(node)
                                        and all(n in scalar for n in node.all_input_nodes)):
            scalar.add(node)
    frontier = [n for n in graph.nodes if n in scalar and n.op != "placeholder"
                and any(user not in scalar for user in n.users)]
    if not frontier:
        return 0
    # scalar nodes read only unwritten 0-d inputs and write nothing, so they may all move ahead of
    # the per-element work; the one hoist call then sits between the two
    anchor = next(n for n in graph.nodes if n.op != "placeholder" and n not in scalar)
    for node in [n for n in graph.nodes if n in scalar and n.op != "placeholder"]:
        anchor.prepend(node)
    with graph.inserting_before(anchor):
        hoisted = graph.call_function(torch.ops.gradchain.hoist.default, (frontier,))
        items = [graph.call_function(operator.getitem, (hoisted, i)) for i in range(len(frontier))]
    for node, item in zip(frontier, items):
        item.meta.update(node.meta)
        node.replace_all_uses_with(item, delete_user_cb=lambda user: user not in scalar and user is not hoisted)
    graph.lint()
    gm.recompile()
    return len(frontier)


# a value of at most this many elements is "small": a per-tensor vector (norms, trust ratios), not
# a flat buffer
SMALL = 1 << 16
_VIEWS = {"unbind", "getitem", "select", "view", "reshape", "expand", "unsqueeze", "squeeze", "__getitem__",
          "flatten", "t", "permute", "contiguous", "to", "type_as"}


def _big(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_big(v) for v in value)
    return isinstance(value, Tensor) and value.numel() > SMALL


def realize_small_values(gm: fx.GraphModule) -> int:
    """Compute each small fresh value that feeds per-element work once, through ``hoist``.

    A per-tensor vector (NAdam's coefficients from its per-param running product) is otherwise
    re-derived from its inputs for every element that reads it. Only values that are neither views
    nor written, and share no storage with an input, are realized, where they stand in the graph
    (nothing moves). Returns the number realized.
    """
    graph = gm.graph
    # neither a view of an input nor anything written: a fresh value, safe to copy where it stands
    aliased = _written_storages(graph) | {_storage(t) for n in graph.nodes if n.op == "placeholder"
                                          for t in _tensors(_value(n))}

    def feeds_big(node: fx.Node) -> bool:
        return any(_big(_value(user)) or (_name(user) in _VIEWS and feeds_big(user)) for user in node.users)

    count = 0
    for node in list(graph.nodes):
        v = _value(node)
        if (node.op not in ("call_function", "call_method") or not isinstance(v, Tensor) or v.dim() == 0
                or v.numel() > SMALL or _name(node) in _VIEWS or _mutated_args(node)
                or node.target is torch.ops.gradchain.hoist.default
                or _storage(v) in aliased or not feeds_big(node)):
            continue
        users = list(node.users)
        with graph.inserting_after(node):
            hoisted = graph.call_function(torch.ops.gradchain.hoist.default, ([node],))
        with graph.inserting_after(hoisted):
            item = graph.call_function(operator.getitem, (hoisted, 0))
        item.meta.update(node.meta)
        for user in users:
            user.replace_input_with(node, item)
        count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count


# how many buffers a value used twice may read before inductor stores it (its default is 4)
REALIZE_READS = 64


def hoisting_backend(backend: str) -> Callable:
    """A ``torch.compile`` backend: ``hoist_scalars`` and ``realize_small_values``, then the named backend."""
    from torch._dynamo.backends.registry import lookup_backend

    inner = lookup_backend(backend)

    def compile_with_hoisting(gm: fx.GraphModule, example_inputs: list) -> Callable:
        hoist_scalars(gm)
        realize_small_values(gm)
        if backend != "inductor":
            return inner(gm, example_inputs)
        # an update read by a per-tensor reduction and by the write (LAMB's trust ratio, the
        # cautious mask) is computed again in the write's kernel, not stored: inductor stores a
        # value used twice once it reads more than a few buffers, and here those reads are mostly
        # 0-d hyperparameters. A full-size buffer costs a write and a read of its own, and on CPU
        # page faults on every step; recomputing it costs arithmetic, which is cheap here. Values
        # with heavy ops or long formulas are still stored (inductor's other thresholds).
        with inductor_config.patch(realize_reads_threshold=REALIZE_READS):
            return inner(gm, example_inputs)

    return compile_with_hoisting
