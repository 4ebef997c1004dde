// Per-channel work in a CUTLASS convolution's epilogue: each element the epilogue stores can be
// transformed on its way to memory and reduced per output channel, so that a pass over the
// conv's output that would follow the conv (reading what it wrote) is not needed. Two uses:
//
//  * OutputStatistics: the batch statistics of an fprop output that feeds a training
//    BatchNorm (issue 17, part 2; the triton backend's convs do the same). The statistics are
//    those of the stored (fp16/bf16) output, what eager BatchNorm computes them from.
//  * PrologueBackward<Element>: the backward of a BN-ReLU prologue in the dgrad of the conv
//    that applied it: grad_x = g * [x * scale + shift > 0] * scale from the dgrad output g as
//    stored, with the sums of the masked g and of the masked g * x (the gradients of shift and
//    scale), what channel_kernels.cu's affine_relu_backward computes in a pass of its own.
//
// How: the epilogue's output tile iterator (PredicatedTileIterator) stores each fragment of the
// output tile; GatheringTileIterator hands each fragment to the thread's ThreadGather first,
// which transforms it and adds its stored elements into per-thread states, one per output
// column the thread writes. After the epilogue, EpilogueGathering merges the threads' states
// per column in shared memory, in thread order, and writes one state per column for the
// threadblock's rows: partials [grid_m, columns] (channel_states.cuh), which a second, small
// kernel merges. No atomics: the results are deterministic.
//
// The bookkeeping (which fragment element is which output element, which thread wrote which
// column) is host-and-device code, checked on a CPU against the kernels' real thread maps by
// tests/cuda_host/epilogue_reductions.cu.
#pragma once

#include <cutlass/array.h>
#include <cutlass/conv/kernel/implicit_gemm_convolution.h>
#include <cutlass/conv/kernel/implicit_gemm_convolution_fusion.h>
#include <cutlass/epilogue/thread/linear_combination.h>
#include <cutlass/epilogue/threadblock/epilogue.h>

#include <cstdint>

#include "channel_states.cuh"

namespace fused_resnet::cutlass_conv {

// Where the slots of an epilogue thread are: in CUTLASS's output thread maps a thread writes
// Iterations::kColumn accesses of kElementsPerAccess consecutive columns, Delta::kColumn
// apart, from its start column, in every row it visits; the rows change from fragment to
// fragment, the columns never do. Slot access * kAccessElements + e is column start + access
// * Delta::kColumn + e.
template <typename ThreadMap>
struct ThreadSlots {
  static int const kAccessElements = ThreadMap::kElementsPerAccess;
  static int const kSlots = ThreadMap::Iterations::kColumn * kAccessElements;

  CUTLASS_HOST_DEVICE static int column(int start_column, int slot) {
    return start_column + slot / kAccessElements * ThreadMap::Delta::kColumn +
           slot % kAccessElements;
  }
};

// The batch statistics of the output: a Welford state per channel, the output unchanged.
struct OutputStatistics {
  using State = Welford;
  struct Params {
    State* partials = nullptr;  // null: no statistics wanted (the kernel's other uses)
  };

  template <typename ThreadMap>
  struct Thread {
    CUTLASS_HOST_DEVICE Thread(Params const&, int, int) {}

    template <typename Access>
    CUTLASS_HOST_DEVICE void operator()(Access& access, State* states, int, int, int,
                                        int) const {
      // The states of one access always take values together: one reciprocal for all.
      float const inverse_new_count = 1.f / (states[0].count + 1.f);
      CUTLASS_PRAGMA_UNROLL
      for (int e = 0; e < Access::kElements; ++e) {
        states[e].add(float(access[e]), inverse_new_count);
      }
    }
  };
};

// The backward of a = relu(x * scale + shift) (a conv's BN-ReLU prologue) applied to the
// conv's dgrad output g = dL/da: stores g * [x * scale + shift > 0] * scale in x's type and
// sums the masked g (Sums::sum, the gradient of shift) and the masked g * x (Sums::dot, of
// scale) per channel, as channel_kernels.cu's affine_relu_backward_kernel does (same fp32
// arithmetic, same rounding). x: NHWC, the dgrad output's layout; scale, shift: fp32.
template <typename Element>
struct PrologueBackward {
  using State = Sums;
  struct Params {
    const Element* x = nullptr;
    const float* scale = nullptr;
    const float* shift = nullptr;
    State* partials = nullptr;
  };

  template <typename ThreadMap>
  struct Thread {
    using Slots = ThreadSlots<ThreadMap>;
    const Element* x;
    float scale[Slots::kSlots], shift[Slots::kSlots];

    CUTLASS_HOST_DEVICE Thread(Params const& params, int start_column, int channels)
        : x(params.x) {
      CUTLASS_PRAGMA_UNROLL
      for (int slot = 0; slot < Slots::kSlots; ++slot) {
        int const c = Slots::column(start_column, slot);
        scale[slot] = c < channels ? params.scale[c] : 0.f;
        shift[slot] = c < channels ? params.shift[c] : 0.f;
      }
    }

    // `access`: the values stored at (row, column + e), the thread's slots slot + e, in an
    // output of `channels` columns.
    template <typename Access>
    CUTLASS_HOST_DEVICE void operator()(Access& access, State* states, int slot, int row,
                                        int column, int channels) const;
  };
};

template <typename Element>
template <typename ThreadMap>
template <typename Access>
CUTLASS_HOST_DEVICE void PrologueBackward<Element>::Thread<ThreadMap>::operator()(
    Access& access, State* states, int slot, int row, int column, int channels) const {
  using Vector = cutlass::AlignedArray<Element, Access::kElements>;  // one 16-byte load
  Vector const inputs = *reinterpret_cast<Vector const*>(x + int64_t(row) * channels + column);
  CUTLASS_PRAGMA_UNROLL
  for (int e = 0; e < Access::kElements; ++e) {
    float const xe = float(inputs[e]);
    // `> 0` as torch's threshold_backward: a NaN pre-activation passes no gradient.
    bool const passed = xe * scale[slot + e] + shift[slot + e] > 0.f;
    float const g = passed ? float(access[e]) : 0.f;
    states[e].sum += g;
    states[e].dot += g * xe;
    access[e] = Element(g * scale[slot + e]);
  }
}

// One epilogue thread's transform and per-column states for `Reduction`.
template <typename ThreadMap, typename Reduction>
struct ThreadGather {
  using Slots = ThreadSlots<ThreadMap>;
  using State = typename Reduction::State;
  using Iterations = typename ThreadMap::Iterations;
  using Delta = typename ThreadMap::Delta;

  typename Reduction::template Thread<ThreadMap> thread;
  State slot[Slots::kSlots];

  CUTLASS_HOST_DEVICE ThreadGather(typename Reduction::Params const& params, int start_column,
                                   int channels)
      : thread(params, start_column, channels) {
    CUTLASS_PRAGMA_UNROLL
    for (int s = 0; s < Slots::kSlots; ++s) slot[s] = State::zero();
  }

  // Transforms the elements of `fragment` that PredicatedTileIterator::store writes (same
  // loops, same guards: rows below extent_row, accesses starting below extent_column) and
  // adds them to the states; the thread's start row and column are the iterator's for this
  // fragment. extent_column is the row pitch of the NHWC tensors too.
  template <typename Fragment>
  CUTLASS_HOST_DEVICE void operator()(Fragment& fragment, int thread_start_row,
                                      int thread_start_column, int extent_row,
                                      int extent_column) {
    using Access = cutlass::Array<typename Fragment::Element, Slots::kAccessElements>;
    Access* accesses = reinterpret_cast<Access*>(&fragment);
    CUTLASS_PRAGMA_UNROLL
    for (int cluster = 0; cluster < Iterations::kCluster; ++cluster) {
      CUTLASS_PRAGMA_UNROLL
      for (int group = 0; group < Iterations::kGroup; ++group) {
        CUTLASS_PRAGMA_UNROLL
        for (int row = 0; row < Iterations::kRow; ++row) {
          int const fragment_row =
              row + Iterations::kRow * (group + Iterations::kGroup * cluster);
          int const output_row = thread_start_row + row * Delta::kRow +
                                 group * Delta::kGroup + cluster * Delta::kCluster;
          CUTLASS_PRAGMA_UNROLL
          for (int column = 0; column < Iterations::kColumn; ++column) {
            int const output_column = thread_start_column + column * Delta::kColumn;
            if (output_row >= extent_row || output_column >= extent_column) continue;
            int const first = column * Slots::kAccessElements;
            thread(accesses[fragment_row * Iterations::kColumn + column], slot + first, first,
                   output_row, output_column, extent_column);
          }
        }
      }
    }
  }
};

// Column `column` (0 <= column < the tile's width) of the threadblock's partial: the states
// of the threads that wrote it, taken from `states` (thread t's slots at t * kSlots) and
// merged in thread order.
template <typename ThreadMap, typename State>
CUTLASS_HOST_DEVICE State merged_column(State const* states, int column) {
  using Slots = ThreadSlots<ThreadMap>;
  State merged = State::zero();
  for (int thread = 0; thread < ThreadMap::kThreads; ++thread) {
    int const offset = column - ThreadMap::initial_offset(thread).column();
    if (offset < 0) continue;
    int const access = offset / ThreadMap::Delta::kColumn;
    int const element = offset % ThreadMap::Delta::kColumn;
    if (access < ThreadMap::Iterations::kColumn && element < Slots::kAccessElements) {
      merged.merge(states[thread * Slots::kSlots + access * Slots::kAccessElements + element]);
    }
  }
  return merged;
}

// y = alpha * acc + beta * source (LinearCombination), carrying the Reduction's parameters.
template <typename Element, int kCount, typename Reduction_>
class LinearCombinationGathering
    : public cutlass::epilogue::thread::LinearCombination<Element, kCount, float, float> {
 public:
  using Base = cutlass::epilogue::thread::LinearCombination<Element, kCount, float, float>;
  using Reduction = Reduction_;

  struct Params : Base::Params {
    typename Reduction::Params reduction;

    CUTLASS_HOST_DEVICE Params() {}
    CUTLASS_HOST_DEVICE Params(float alpha, float beta,
                               typename Reduction::Params const& reduction)
        : Base::Params(alpha, beta), reduction(reduction) {}
  };

  CUTLASS_HOST_DEVICE explicit LinearCombinationGathering(Params const& params)
      : Base(params), reduction_(params.reduction) {}

  CUTLASS_HOST_DEVICE typename Reduction::Params const& reduction() const { return reduction_; }

 private:
  typename Reduction::Params reduction_;
};

// The epilogue's output tile iterator, handing each fragment to a ThreadGather (when one is
// attached: the destination iterator) before storing it.
template <typename OutputTileIterator, typename Reduction>
class GatheringTileIterator : public OutputTileIterator {
 public:
  using Base = OutputTileIterator;
  using ThreadMap = typename Base::ThreadMap;
  using Gather = ThreadGather<ThreadMap, Reduction>;
  using Base::Base;

  CUTLASS_DEVICE void gather_into(Gather* gather) { gather_ = gather; }

  CUTLASS_DEVICE void store(typename Base::Fragment const& fragment) const {
    if (gather_ == nullptr) {
      Base::store(fragment);
      return;
    }
    typename Base::Fragment gathered = fragment;
    (*gather_)(gathered, this->thread_start_row(), this->thread_start_column(),
               this->extent_row(), this->extent_column());
    Base::store(gathered);
  }

 private:
  Gather* gather_ = nullptr;
};

// CUTLASS's Epilogue with GatheringTileIterator as its output tile iterator.
template <typename Epilogue>
struct GatheringEpilogue;

template <typename Shape, typename WarpMma, int kPartitionsK, typename OutputTileIterator,
          typename AccumulatorFragmentIterator, typename WarpTileIterator,
          typename SharedLoadIterator, typename OutputOp, typename Padding, int kFragments,
          int kUnroll>
struct GatheringEpilogue<cutlass::epilogue::threadblock::Epilogue<
    Shape, WarpMma, kPartitionsK, OutputTileIterator, AccumulatorFragmentIterator,
    WarpTileIterator, SharedLoadIterator, OutputOp, Padding, kFragments, kUnroll>> {
  using Type = cutlass::epilogue::threadblock::Epilogue<
      Shape, WarpMma, kPartitionsK,
      GatheringTileIterator<OutputTileIterator, typename OutputOp::Reduction>,
      AccumulatorFragmentIterator, WarpTileIterator, SharedLoadIterator, OutputOp, Padding,
      kFragments, kUnroll>;
};

// `Epilogue` (a CUTLASS threadblock Epilogue whose output op is a LinearCombinationGathering)
// running the output op's Reduction on every fragment it stores and, when the reduction's
// parameters name partials, writing the threadblock's per-column partial states after the
// tile: partials[tile_m * columns + n] for the tile's rows and each of its columns n.
template <typename Epilogue>
class EpilogueGathering : public GatheringEpilogue<Epilogue>::Type {
 public:
  using Base = typename GatheringEpilogue<Epilogue>::Type;
  using OutputOp = typename Base::OutputOp;
  using OutputTileIterator = typename Base::OutputTileIterator;
  using ThreadMap = typename OutputTileIterator::ThreadMap;
  using Gather = typename OutputTileIterator::Gather;
  using State = typename Gather::State;
  using Shape = typename Base::Shape;
  static int const kSlots = ThreadSlots<ThreadMap>::kSlots;

  union SharedStorage {
    typename Base::SharedStorage epilogue;
    State states[ThreadMap::kThreads * kSlots];
  };

  CUTLASS_DEVICE EpilogueGathering(SharedStorage& shared, int thread_idx, int warp_idx,
                                   int lane_idx)
      : Base(shared.epilogue, thread_idx, warp_idx, lane_idx),
        states_(shared.states),
        thread_(thread_idx) {}

  CUTLASS_DEVICE void operator()(OutputOp const& output_op, OutputTileIterator destination,
                                 typename Base::AccumulatorTile const& accumulators,
                                 OutputTileIterator source) {
    State* const partials = output_op.reduction().partials;  // the same for the whole grid
    // The tile's first row and column: where the iterator starts, less the thread's offset.
    cutlass::MatrixCoord const own = ThreadMap::initial_offset(thread_);
    int const tile_row = destination.thread_start_row() - own.row();
    int const tile_column = destination.thread_start_column() - own.column();
    int const columns = destination.extent_column();
    // Attached unconditionally, so that the states stay in registers (a pointer that may be
    // null would put them on the stack); without partials they are gathered and dropped.
    Gather gather(output_op.reduction(), destination.thread_start_column(), columns);
    destination.gather_into(&gather);
    Base::operator()(output_op, destination, accumulators, source);
    if (partials == nullptr) return;
    __syncthreads();  // the epilogue's last shared-memory reads, before the states reuse it
    CUTLASS_PRAGMA_UNROLL
    for (int s = 0; s < kSlots; ++s) states_[thread_ * kSlots + s] = gather.slot[s];
    __syncthreads();
    for (int column = thread_; column < Shape::kN; column += ThreadMap::kThreads) {
      if (tile_column + column < columns) {
        partials[int64_t(tile_row / Shape::kM) * columns + tile_column + column] =
            merged_column<ThreadMap>(states_, column);
      }
    }
  }

 private:
  State* states_;
  int thread_;
};

// `Kernel` (a CUTLASS implicit-GEMM convolution kernel) with EpilogueGathering.
template <typename Kernel>
struct WithGatheringEpilogue;

template <typename Mma, typename Epilogue, typename Swizzle, cutlass::conv::Operator kOperator,
          typename ProblemSize, cutlass::conv::GroupMode kGroupMode>
struct WithGatheringEpilogue<cutlass::conv::kernel::ImplicitGemmConvolution<
    Mma, Epilogue, Swizzle, kOperator, ProblemSize, kGroupMode>> {
  using Kernel = cutlass::conv::kernel::ImplicitGemmConvolution<
      Mma, EpilogueGathering<Epilogue>, Swizzle, kOperator, ProblemSize, kGroupMode>;
};

template <typename Mma, typename Epilogue, typename Swizzle, cutlass::conv::Operator kOperator,
          typename ProblemSize>
struct WithGatheringEpilogue<cutlass::conv::kernel::ImplicitGemmConvolutionFusion<
    Mma, Epilogue, Swizzle, kOperator, ProblemSize>> {
  using Kernel = cutlass::conv::kernel::ImplicitGemmConvolutionFusion<
      Mma, EpilogueGathering<Epilogue>, Swizzle, kOperator, ProblemSize>;
};

}  // namespace fused_resnet::cutlass_conv
