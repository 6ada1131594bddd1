"""What a forward and a scoring step dispatch: aten ops that launch work (views launch nothing) and ops that make
the host wait for the device (``.item()``, ``nonzero``, ``unique``, a copy to the host). ``avarc bench`` reports
them on every device and the tests hold them down; on CUDA, eager, each counted op is about one kernel launch."""
from __future__ import annotations

import collections

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .model import Model
from .transfers import reading

SYNC_OPS = frozenset({"_local_scalar_dense", "item", "nonzero", "unique", "_unique", "_unique2", "unique_dim",
                      "unique_consecutive", "masked_select", "argwhere", "equal", "is_nonzero"})

ALLOCATIONS = frozenset({"empty", "empty_strided", "new_empty", "new_empty_strided"})   # no kernel runs


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside it that run a kernel (not views, not bare allocations) by name, and the
    host syncs among them (a sync op, or a copy between devices). A higher-order operator (FlexAttention, which a
    compiled block step runs) counts as the one kernel it compiles to; what it runs eagerly is not counted."""

    supports_higher_order_operators = True

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            self.ops[func.name()] += 1
            return func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if not func.is_view and name not in ALLOCATIONS:
            self.ops[name] += 1
        to = kwargs.get("device")
        crossing = name == "_to_copy" and to is not None and torch.device(to) != args[0].device
        # A pinned non-blocking upload queues behind the device's work; the host does not wait for it.
        upload = crossing and kwargs.get("non_blocking", False) and args[0].device.type == "cpu" and args[0].is_pinned()
        if name in SYNC_OPS or (crossing and not upload):
            self.syncs += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.ops.values())


# Python-level calls that bring a tensor's values to the host (on a GPU each waits for the device).
HOST_READS = frozenset({"tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__",
                        *SYNC_OPS})


class HostReads(TorchFunctionMode):
    """Counts host reads of what the device computed, on any device (a CPU included, where nothing really moves): a
    tensor counts as on the device when it was computed from the given modules' weights, which on a GPU are exactly
    the tensors that live there (the host's own bookkeeping on token ids is never read from the device). A read is
    a call of :data:`HOST_READS`, a copy ``.to("cpu")`` or indexing by a boolean mask (its size is data); those made
    inside :func:`~core.engine.transfers.host_read` are counted apart, as ``between``."""

    def __init__(self, *modules: torch.nn.Module):
        super().__init__()
        self._on_device = {_storage(t) for m in modules for t in (*m.parameters(), *m.buffers())} - {0}
        self.inside: collections.Counter[str] = collections.Counter()    # reads outside host_read, by call
        self.between = 0                                                  # reads inside host_read

    def _from_device(self, t: object) -> bool:
        return isinstance(t, torch.Tensor) and _storage(t) in self._on_device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = tree_leaves((args, kwargs))
        derived = any(self._from_device(t) for t in leaves)
        name = getattr(func, "__name__", "")
        mask = name in ("__getitem__", "__setitem__") and any(
            self._from_device(t) and t.dtype == torch.bool for t in tree_leaves(args[1:2]))
        to_host = name == "to" and derived and any(str(a) == "cpu" for a in (*args[1:], *kwargs.values()))
        read = (derived and name in HOST_READS) or mask or to_host
        if read:
            if reading():
                self.between += 1
            else:
                self.inside[name] += 1
        out = func(*args, **kwargs)
        inputs = {_storage(t) for t in leaves if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):     # what a read returns is on the host
                self._mark(t, derived and not read, fresh=read or _storage(t) not in inputs)
        if derived and (name == "__setitem__" or (name.endswith("_") and not name.startswith("__"))):
            self._mark(args[0], True, fresh=False)
        if derived and isinstance(kwargs.get("out"), torch.Tensor):
            self._mark(kwargs["out"], True, fresh=False)
        return out

    def _mark(self, t: torch.Tensor, derived: bool, fresh: bool) -> None:
        """A result computed from device data is on the device; a fresh result of host data is not (its memory may
        have held device data before)."""
        key = _storage(t)
        if not key:
            return
        if derived:
            self._on_device.add(key)
        elif fresh:
            self._on_device.discard(key)


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0


@torch.no_grad()
def engine_counters(model: Model, rows: int = 1) -> dict[str, float]:
    """Launches (non-view aten ops) of one full-length forward of ``rows`` pairs, and host syncs of one scoring step
    (``score_pairs`` with its cache kept), in the model's dtype, each after a warm-up call. The step is counted on
    the first two scales: its syncs do not depend on the length, and on a CPU each full forward of d16 costs
    seconds. A compiled engine is counted eagerly on the plan it compiles (the ops its graphs fuse): compiled code
    called inside a dispatch mode makes dynamo skip the block for good, and every later call would run eagerly."""
    with torch.compiler.set_stance("force_eager"):
        return _count(model, rows)


def _count(model: Model, rows: int) -> dict[str, float]:
    spec = model.spec.var
    tokens = torch.randint(0, spec.vocab_size, (rows, spec.seq_len), generator=torch.Generator().manual_seed(0))
    classes = torch.arange(rows) % model.num_classes
    short = min(2, len(spec.patch_nums))
    for _ in range(2):     # the first call warms up (class table, attention plan)
        with OpCounter() as step:
            model.score_pairs(tokens, classes, short, keep_cache=True)
    var = model.engine_var()
    mods = var.class_table(classes.tolist()).lookup(classes.to(model.device))
    x_in = model.vae.quantize.var_input(tokens.to(model.device))
    for _ in range(2):
        with OpCounter() as fwd:
            var.hidden(classes.to(model.device), x_in, mods=mods)
    return {"launches_per_forward": float(fwd.total), "host_syncs_per_step": float(step.syncs)}
