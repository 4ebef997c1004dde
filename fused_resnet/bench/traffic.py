"""Kernel launches, bytes moved and memory kept for backward of one step, counted exactly
on the meta device: shapes, no data, no GPU (ResNet-50 at batch 256 in about a second on
a CPU). ``python -m fused_resnet.bench --traffic``.

Counting rules (the same for every contender; benchmarks/README.md explains them):

* a launch is every op call that reaches the dispatcher, aten or the project's C++ ops
  (through their fake implementations), except views and metadata ops
  (:data:`NOT_LAUNCHES`: no kernel runs) and allocations without initialization
  (``empty*``); an op that may return a view (``to``, ``contiguous``, ``reshape``) is a
  launch when it returned a copy;
* an op's bytes are the storage sizes of its tensor inputs and outputs, each storage
  counted once per call;
* saved bytes are the distinct storages autograd packs for backward
  (``saved_tensors_hooks``), parameters and buffers excluded (they live anyway);
* peak bytes are the most bytes held at once by storages created during the step.

The project's Triton ops count by what their implementations do: each kernel they
launch (recorded, not run: its tensor arguments' storages as bytes) and each aten call
they make besides (the rules above). The C++ ops count by their declared models
(:mod:`fused_resnet.cuda_launches`): the CUDA kernels and memsets each launches, with the
tensors they touch, and the ATen calls its C++ code makes.
"""

from __future__ import annotations

import weakref
from typing import Callable, Iterable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from fused_resnet import cuda_launches

# What the counter can count: eager PyTorch and the fused backends (torch.compile's
# contenders run generated code that dispatch does not see).
CONTENDERS = ["eager", "reference", "triton", "cuda"]

# Ops that launch no kernel: views, aliases and metadata (no data is read or written).
NOT_LAUNCHES = {"detach", "alias", "lift_fresh", "empty", "empty_like", "empty_strided",
                "new_empty", "new_empty_strided", "_reshape_alias", "set_", "resize_",
                "promote_types", "sym_size", "sym_stride", "sym_numel",
                "sym_storage_offset", "is_same_size", "_local_scalar_dense",
                "conv_launch_plan"}  # the last: host arithmetic (fused_resnet._C's plans)


# Ops whose meta kernels give NCHW results where cuDNN gives channels_last ones (cuDNN
# follows a channels_last input or weight): the counter lays their results out as a GPU
# run sees them, or every op after them would see a layout no GPU run has.
_CUDNN_LAYOUT_OPS = {"convolution", "convolution_backward"}


def _is_channels_last(t: torch.Tensor) -> bool:
    return (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
            and not t.is_contiguous())


def _as_cudnn_lays_out(func, args, out):
    if (_op_name(func) not in _CUDNN_LAYOUT_OPS
            or not any(_is_channels_last(t) for t in _tensors(args))):
        return out
    return tree_map(lambda t: t.contiguous(memory_format=torch.channels_last)
                    if isinstance(t, torch.Tensor) and t.dim() == 4 else t, out)


def _op_name(func) -> str:
    """The op's name without its namespace (``convolution``, ``triton_conv``)."""
    return func._schema.name.split("::")[-1]


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _is_launch(func) -> bool:
    return not func.is_view and _op_name(func) not in NOT_LAUNCHES


def _copied(func, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> bool:
    """Whether an aliasing op (``to``, ``contiguous``, ``reshape``: their schemas say they
    may return a view) made a copy: a result in a storage none of its inputs has. Outside
    autograd these reach the counter undecomposed, so their copy (``_to_copy``, ``clone``)
    is not seen on its own."""
    sources = {_storage_key(t) for t in inputs}
    return func.is_view and any(_storage_key(t) not in sources for t in outputs)


def _project_implementations() -> dict[str, Callable]:
    try:
        from fused_resnet import triton_ops
    except ImportError:  # without triton, its ops are not there to count
        return {}
    return triton_ops.IMPLEMENTATIONS


def _kernel_name(kernel) -> str:
    while hasattr(kernel, "fn"):  # autotuner -> jit function -> Python function
        kernel = kernel.fn
    return kernel.__name__


class TrafficCounter(TorchDispatchMode):
    """Counts launches and bytes of every op call, and the live bytes of storages
    created while it is active (see the module docstring for the rules).

    The project's Triton ops are counted by what they do: their Python implementation
    runs on the meta tensors with each kernel launch recorded instead of run (one launch,
    the storages of its tensor arguments as bytes), so the aten calls they make besides
    their kernels (buffers, reductions finished in PyTorch, layout copies) count too.
    The C++ ops are counted the same way through their models in
    :mod:`fused_resnet.cuda_launches`, which make the ATen calls the C++ code makes and
    record each CUDA kernel it launches.
    """

    def __init__(self) -> None:
        super().__init__()
        self.launches = 0
        self.bytes = 0
        self.by_op: dict[str, list[int]] = {}   # op or kernel name -> [launches, bytes]
        self.live_bytes = 0
        self.peak_bytes = 0
        self._tracked: set[int] = set()
        self._implementations = _project_implementations()

    def ignore_storages_of(self, tensors: Iterable[torch.Tensor]) -> None:
        """Storages that exist before the step (parameters, input) are not the step's."""
        self._tracked.update(_storage_key(t) for t in tensors)

    def _track(self, t: torch.Tensor) -> None:
        # A storage's Python object lives exactly as long as the storage itself (PyTorch
        # keeps it while any tensor, autograd's saved ones included, refers to it).
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._tracked:
            return
        self._tracked.add(key)
        self.live_bytes += storage.nbytes()
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(storage, self._release, key, storage.nbytes())

    def _release(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live_bytes -= nbytes

    def _count(self, name: str, tensors: list[torch.Tensor]) -> None:
        moved = sum({_storage_key(t): t.untyped_storage().nbytes() for t in tensors}.values())
        self.launches += 1
        self.bytes += moved
        entry = self.by_op.setdefault(name, [0, 0])
        entry[0] += 1
        entry[1] += moved

    def _record_kernel(self, kernel, args) -> None:
        self._count(_kernel_name(kernel), _tensors(args))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        namespace, name = func._schema.name.split("::")
        implementation = self._implementations.get(name) if namespace == "fused_resnet" \
            else None
        if implementation is not None:
            from fused_resnet.kernels import tuning
            with tuning.launches_recorded(self._record_kernel), self:
                return implementation(*args, **kwargs)
        model = cuda_launches.MODELS.get(name) if namespace == "fused_resnet" else None
        if model is not None:
            with self:
                return model(self._count, *args, **kwargs)
        out = _as_cudnn_lays_out(func, args, func(*args, **kwargs))
        outputs = _tensors(out)
        inputs = _tensors((args, kwargs))
        for t in outputs:
            self._track(t)
        if _is_launch(func) or _copied(func, inputs, outputs):
            self._count(name, inputs + outputs)
        return out


class SavedBytes:
    """Distinct storages that autograd saves for backward, as a context manager."""

    def __init__(self, exclude: Iterable[torch.Tensor]) -> None:
        self._exclude = {_storage_key(t) for t in exclude}
        self._seen: set[int] = set()
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in self._exclude and key not in self._seen:
            self._seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
        return t

    def __enter__(self) -> "SavedBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def count(module: nn.Module, step: Callable[[], object], inputs: Iterable[torch.Tensor],
          ) -> dict:
    """Launches, bytes, saved bytes and peak bytes of ``step()`` on meta-device
    ``module``; ``inputs`` are the tensors the step reads that exist before it."""
    state = [*module.parameters(), *module.buffers(), *inputs]
    counter = TrafficCounter()
    counter.ignore_storages_of(state)
    with SavedBytes(exclude=state) as saved, counter:
        step()
    return {"launches": counter.launches, "bytes": counter.bytes, "saved_bytes": saved.bytes,
            "peak_bytes": counter.peak_bytes,
            "by_op": {name: {"launches": n, "bytes": b}
                      for name, (n, b) in sorted(counter.by_op.items(),
                                                 key=lambda item: -item[1][1])}}


def workload_step(module: nn.Module, workload) -> tuple[Callable[[], None], list]:
    """``(step, inputs)``: one step of ``workload`` (a meta-device
    :class:`fused_resnet.bench.workloads.Workload`) on ``module``, forward and backward in
    training (a model's loss is the mean square of its output; a block's output gradient
    is given), the forward without autograd in eval; ``inputs``, the tensors it reads that
    exist before it."""
    x = workload.input
    module.train(workload.mode == "train")
    if workload.mode == "eval":
        def step():
            with torch.no_grad():
                module(x)
        return step, [x]
    x = x.detach().requires_grad_(workload.block is not None)
    grad_output = None if workload.block is None else torch.empty_like(module(x))

    def step():
        output = module(x)
        if grad_output is None:
            output.float().square().mean().backward()
        else:
            output.backward(grad_output)
    return step, [x] + ([] if grad_output is None else [grad_output])


def count_workload(module: nn.Module, workload) -> dict:
    """:func:`count` of one step of ``workload`` on ``module`` (:func:`workload_step`)."""
    step, inputs = workload_step(module, workload)
    return count(module, step, inputs)
