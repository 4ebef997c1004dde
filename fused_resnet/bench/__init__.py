"""``python -m fused_resnet.bench`` (also ``fused-resnet-bench``): throughput and memory of
fused ResNets and of their single blocks against eager PyTorch and ``torch.compile``,
measured in the same run.

Workloads: whole models (``--model``) or each distinct block shape of them (``--blocks``,
``--block NAME``), in training (forward + backward, and an SGD step for models) or
inference, for every combination of ``--model``, ``--mode`` and ``--batch-size`` given.
Contenders: ``eager`` (the same network with plain modules: cuDNN on GPUs), ``compile``
and ``compile-max-autotune`` (``torch.compile`` of eager), and each fused backend
(``reference``, ``triton``, ``cuda``). Before timing, each contender's output is checked
once against eager's; a contender that fails gets its error instead of a number.

Reported: median step time and quartiles (CUDA events), images/s, speed-up against eager
and against ``torch.compile``, peak memory, and for block workloads the fraction of the
roofline reached: the larger of FLOPs at the device's matrix-product rate and minimal
bytes at its copy bandwidth, both measured in the same run. A table on stdout, JSON with
``--json``, a PNG chart with ``--plot``.

On a machine without a GPU it runs a tiny CPU workload: CPU figures say nothing about GPU
speed, and the output says so.
"""



def main(argv=None) -> int:
    """The command line (see the module docstring); ``argv`` defaults to ``sys.argv``."""
    # Imported here so that ``python -m fused_resnet.bench.report`` does not import its own
    # module twice through the package.
    from fused_resnet.bench.cli import main as run
    return run(argv)
