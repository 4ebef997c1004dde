"""The planted bugs of the mutation check (tools/mutate.py): realistic one-line slips in
the kernels, the block plan, the reference, the converter and the CPU kernel of csrc/.

Each mutant replaces one exact piece of text (which must occur exactly once in its file)
and names the tests that must then fail. A mutant that survives is either killed by a new
test or explained here.
"""

from typing import NamedTuple


class Mutant(NamedTuple):
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


TRITON_OPS = ("tests/test_triton_ops.py", "tests/test_gpu_size_paths.py")
TRITON_BLOCKS = ("tests/test_triton_blocks.py",)
STEM = ("tests/test_stem.py",)
EXTENSION_CPU = ("tests/test_extension.py", "-k", "cpu or nan or opcheck or residual_affine")
CUDA_HOST = ("tests/test_cuda_host.py",)

MUTANTS = [
    # kernels/: tiles, masks, reductions (the GPU-size paths included).
    Mutant("tile-columns-use-BLOCK_M", "kernels/conv_forward.py",
           "columns = tl.program_id(1) * BLOCK_N", "columns = tl.program_id(1) * BLOCK_M",
           TRITON_OPS),
    Mutant("grouped-columns-use-BLOCK_M", "kernels/conv_forward.py",
           "columns = in_group // rows_in_group * BLOCK_N",
           "columns = in_group // rows_in_group * BLOCK_M", TRITON_OPS),
    Mutant("grouped-grid-channels-by-BLOCK_M", "kernels/conv_forward.py",
           'triton.cdiv(columns, meta["BLOCK_N"])', 'triton.cdiv(columns, meta["BLOCK_M"])',
           TRITON_OPS),
    Mutant("forward-padding-top-unmasked", "kernels/conv_forward.py",
           "pixel_valid = row_valid & (hi >= 0) & (hi < H)", "pixel_valid = row_valid & (hi < H)",
           TRITON_OPS),
    Mutant("forward-prologue-pads-with-relu-of-shift", "kernels/conv_forward.py",
           "a = tl.where(a_mask, a, 0.0).to(x_ptr.dtype.element_ty)\n        b =",
           "a = a.to(x_ptr.dtype.element_ty)\n        b =", TRITON_OPS),
    Mutant("grouped-order-ignores-the-partial-group", "kernels/conv_forward.py",
           "tile_m = first_m + in_group % rows_in_group",
           "tile_m = first_m + in_group % GROUP_M", TRITON_OPS),
    Mutant("dgrad-flat-loop-chunk-offset-dropped", "kernels/conv_backward.py",
           "k = (step - tap * chunks) * BLOCK_K + k_range\n        k_valid = k < C_out",
           "k = step * 0 * BLOCK_K + k_range\n        k_valid = k < C_out", TRITON_OPS),
    Mutant("dgrad-drops-the-other-gradient", "kernels/conv_backward.py",
           "acc += tl.load(other_ptr", "acc += 0.0 * tl.load(other_ptr",
           TRITON_OPS + TRITON_BLOCKS),
    Mutant("dgrad-parity-taps-ignore-the-padding", "kernels/conv_backward.py",
           "first_kh = (h_parity + PAD) % STRIDE", "first_kh = h_parity % STRIDE", TRITON_OPS),
    Mutant("dgrad-parity-class-rows-unmasked", "kernels/conv_backward.py",
           "row_valid = row_valid & (h_ < H) & (w_ < W)", "row_valid = row_valid & (h_ < H)",
           TRITON_OPS),
    Mutant("dgrad-prologue-gradient-unscaled", "kernels/conv_backward.py",
           "acc = grad_pre * scale[None, :]", "acc = grad_pre", TRITON_OPS),
    Mutant("wgrad-splits-all-write-slot-0", "kernels/conv_backward.py",
           "offsets = ((split * C_out", "offsets = ((0 * C_out", TRITON_OPS),
    Mutant("wgrad-split-reads-past-its-end", "kernels/conv_backward.py",
           "pixel_valid = pixels < end", "pixel_valid = pixels < M", TRITON_OPS),
    Mutant("wgrad-prologue-pads-with-relu-of-shift", "kernels/conv_backward.py",
           "a = tl.where(a_mask, a, 0.0).to(x_ptr.dtype.element_ty)\n        acc +=",
           "a = a.to(x_ptr.dtype.element_ty)\n        acc +=", TRITON_OPS),
    Mutant("dgrad-scaled-gradient-unscaled", "kernels/conv_backward.py",
           "g = g.to(tl.float32) * tl.load(grad_scale_ptr + k, mask=k_valid,",
           "g = g.to(tl.float32) * 1.0 + 0 * tl.load(grad_scale_ptr + k, mask=k_valid,",
           TRITON_OPS),
    Mutant("wgrad-scaled-gradient-unscaled", "kernels/conv_backward.py",
           "g = g.to(tl.float32) * grad_scale\n", "g = g.to(tl.float32)\n", TRITON_OPS),
    Mutant("masked-gradient-scaled-anyway", "kernels/elementwise.py",
           "tl.store(grad_a_ptr + offsets, g.to(grad_a_ptr.dtype.element_ty), mask=mask)",
           "tl.store(grad_a_ptr + offsets, (g * 2.0).to(grad_a_ptr.dtype.element_ty), "
           "mask=mask)", TRITON_OPS),
    Mutant("finalize-backward-from-tiles-reads-the-shift-row-twice",
           "kernels/batch_norm_finalize.py",
           "summed_tiles(sums_ptr + SCALE_KIND * MAX_TILES * C,",
           "summed_tiles(sums_ptr + 0 * MAX_TILES * C,", TRITON_OPS),
    Mutant("sum-splits-reads-split-0-only", "kernels/conv_backward.py",
           "        split_ptr += size\n", "", TRITON_OPS),
    Mutant("merge-drops-the-spread-of-block-means", "kernels/statistics.py",
           "m2 += block_m2 + delta * delta * count * block_count",
           "m2 += block_m2 + delta * count * block_count", TRITON_OPS),
    Mutant("merge-skips-the-last-tile", "kernels/statistics.py",
           "mask = (rows < tiles)[:, None] & channel_valid[None, :]\n        offsets =",
           "mask = (rows < tiles - 1)[:, None] & channel_valid[None, :]\n        offsets =",
           TRITON_OPS),
    Mutant("tile-mean-over-all-rows", "kernels/statistics.py",
           "/ tl.maximum(count, 1.0)\n    deviation", "/ values.shape[0]\n    deviation",
           TRITON_OPS),
    Mutant("bn-add-relu-backward-scale-sum-without-a", "kernels/elementwise.py",
           "tl.sum(g * a, axis=0)", "tl.sum(g, axis=0)", TRITON_OPS),
    Mutant("statistics-term-variance-halved", "kernels/statistics.py",
           "grad_mean + 2.0 * grad_var * centred", "grad_mean + 1.0 * grad_var * centred",
           TRITON_OPS),
    Mutant("dgrad-statistics-term-on-padding-taps", "kernels/conv_backward.py",
           "not a 0 term.\n            g = tl.where(g_mask, g, 0.0)",
           "not a 0 term.\n            g = tl.where(True, g, 0.0)", TRITON_OPS),
    Mutant("finalize-eps-outside-the-sqrt", "kernels/batch_norm_finalize.py",
           "tl.sqrt_rn(var + eps)", "(tl.sqrt_rn(var) + eps)", TRITON_OPS),
    Mutant("finalize-running-var-biased", "kernels/batch_norm_finalize.py",
           "_blend(var, running_var_ptr, channels, valid, factor, unbias)",
           "_blend(var, running_var_ptr, channels, valid, factor, 1.0)", TRITON_OPS),
    Mutant("merging-finalize-counts-the-batch-per-program", "kernels/batch_norm_finalize.py",
           "    if tl.program_id(0) == 0:\n        factor = _count_batch(",
           "    if True:\n        factor = _count_batch(", TRITON_OPS),
    Mutant("finalize-backward-forgets-shift-through-scale", "kernels/batch_norm_finalize.py",
           "- grad_shift * mean\n", "\n", TRITON_OPS),
    Mutant("stem-pool-takes-the-last-of-tied-maxima", "kernels/stem.py",
           "wins = mask & ((value > best)", "wins = mask & ((value >= best)", STEM),
    Mutant("stem-backward-skips-a-window", "kernels/stem.py",
           "tl.static_range(windows * windows)", "tl.static_range(windows * windows - 1)",
           STEM),
    Mutant("stem-backward-without-the-relu-mask", "kernels/stem.py",
           "tl.where(mask & passed, acc, 0.0)", "tl.where(mask, acc, 0.0)", STEM),
    Mutant("statistics-backward-pass-unscaled", "kernels/elementwise.py",
           "g = g * _per_channel(grad_scale_ptr, channels, channel_valid)", "g = g", STEM),
    # The block plan (fused_resnet/fused_blocks.py).
    Mutant("plan-post-act-shortcut-bn-mixed-up", "fused_resnet/fused_blocks.py",
           "shortcut.bn, stride)\n", "layers[-1][1], stride)\n", TRITON_BLOCKS),
    Mutant("plan-pre-act-projection-reads-raw-x", "fused_resnet/fused_blocks.py",
           "self._conv(x_bn, shortcut.weight, stride, scale_shift))",
           "self._conv(x, shortcut.weight, stride, None))", TRITON_BLOCKS),
    Mutant("plan-eval-drops-the-residual", "fused_resnet/fused_blocks.py",
           "residual=identity if last else None, relu=True)", "relu=True)", TRITON_BLOCKS),
    # The reference (fused_resnet/reference.py), checked against PyTorch's own modules.
    Mutant("reference-running-var-biased", "fused_resnet/reference.py",
           "unbiased_var = var.detach() * (count / (count - 1))",
           "unbiased_var = var.detach()", ("tests/test_reference.py", "tests/test_blocks.py")),
    Mutant("reference-eps-outside-the-rsqrt", "fused_resnet/reference.py",
           "scale = torch.rsqrt(var + eps)", "scale = torch.rsqrt(var) + eps",
           ("tests/test_reference.py", "tests/test_blocks.py")),
    # The converter (fused_resnet/structure.py).
    Mutant("converter-identity-accepted-as-activation", "fused_resnet/structure.py",
           "if type(child) is not nn.ReLU:",
           "if type(child) not in (nn.ReLU, nn.Identity):", ("tests/test_convert.py",)),
    Mutant("converter-dilation-not-checked", "fused_resnet/structure.py",
           '"dilation": (1, 1),\n                "padding"', '"padding"',
           ("tests/test_convert.py",)),
    Mutant("converter-conv-bias-accepted", "fused_resnet/structure.py",
           "if conv.bias is not None:", "if False:", ("tests/test_convert.py",)),
    Mutant("converter-hooks-not-checked", "fused_resnet/structure.py",
           "if any(getattr(module, kind) for kind in HOOK_KINDS):", "if False:",
           ("tests/test_convert.py",)),
    Mutant("change-after-convert-misses-hooks", "fused_resnet/structure.py",
           "tuple(len(getattr(module, h)) for h in HOOK_KINDS)", "()",
           ("tests/test_convert.py",)),
    # csrc/'s CPU kernel, whose per-element formula the CUDA kernel shares (rebuilt
    # CPU-only for each mutant).
    Mutant("cpu-kernel-relu-drops-nan", "csrc/scale_shift_add_relu.h",
           "return (relu && v < acc_t(0)) ? acc_t(0) : v;",
           "return relu ? std::max(acc_t(0), v) : v;", EXTENSION_CPU),
    Mutant("cpu-kernel-nchw-channel-stride", "csrc/scale_shift_add_relu.cpp",
           "nchw ? x.size(2) * x.size(3) : 1", "nchw ? x.size(2) : 1", EXTENSION_CPU),
    Mutant("cpu-kernel-residual-shift-dropped", "csrc/scale_shift_add_relu.h",
           "residual * affine.scale[c] + affine.shift[c]", "residual * affine.scale[c]",
           EXTENSION_CPU),
    # csrc/'s epilogue reductions, whose bookkeeping tests/cuda_host/ checks on the CPU
    # against the kernels' thread maps.
    Mutant("epilogue-gathers-the-row-past-the-output", "csrc/epilogue_reductions.cuh",
           "if (output_row >= extent_row || output_column >= extent_column) continue;",
           "if (output_row > extent_row || output_column >= extent_column) continue;",
           CUDA_HOST),
    Mutant("epilogue-merge-skips-thread-0", "csrc/epilogue_reductions.cuh",
           "for (int thread = 0; thread < ThreadMap::kThreads; ++thread) {",
           "for (int thread = 1; thread < ThreadMap::kThreads; ++thread) {", CUDA_HOST),
    Mutant("prologue-backward-stores-the-unscaled-gradient", "csrc/epilogue_reductions.cuh",
           "access[e] = Element(g * scale[slot + e]);", "access[e] = Element(g);", CUDA_HOST),
]
