// Host-side check of the convolutions' epilogue reductions (csrc/epilogue_reductions.cuh) with
// the real thread maps of the kernels that run them: every thread of a threadblock is run in
// turn on the CPU, storing its fragments as PredicatedTileIterator::store does (its loops,
// guards and operator++, transcribed below) after ThreadGather has transformed them and added
// them to its states, and the states are merged per column with merged_column, as
// EpilogueGathering does in shared memory. Checked, for both tiles and both element types:
//  * every element of the tile inside the output is stored exactly once, and gathered once;
//  * OutputStatistics (the fprop kernels): stores the output unchanged; each column's merged
//    (count, mean, M2) matches an fp64 two-pass computation over the tile's rows, at the
//    output's bottom and right edges and for |mean| >> std;
//  * PrologueBackward (the BN-ReLU dgrad): stores g * [x * scale + shift > 0] * scale exactly
//    as channel_kernels.cu's pass computes it, and each column's merged sums of the masked g
//    and g * x match fp64.
//
// Built and run by tests/test_cuda_host.py (nvcc, no GPU). Exit status 0: all passed.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "conv_backward.cuh"
#include "conv_fprop.cuh"

namespace {

using fused_resnet::Sums;
using fused_resnet::Welford;
using namespace fused_resnet::cutlass_conv;

int failures = 0;

void fail(const char* what, const char* name, int a, int b, double got, double want) {
  if (++failures <= 20) {
    std::printf("FAIL %s: %s at (%d, %d): got %.9g, expected %.9g\n", name, what, a, b, got,
                want);
  }
}

// thread_start_row after PredicatedTileIterator::operator++ (its row bookkeeping).
template <typename ThreadMap>
struct RowAdvance {
  int state[3] = {0, 0, 0};

  int operator()(int start_row) {
    using Shape = typename ThreadMap::Shape;
    using Count = typename ThreadMap::Count;
    ++state[0];
    start_row += Shape::kRow;
    if (state[0] == Count::kRow) {
      state[0] = 0;
      ++state[1];
      start_row += (Shape::kGroup - 1) * Shape::kRow * Count::kRow;
      if (state[1] == Count::kGroup) {
        state[1] = 0;
        ++state[2];
        start_row += Count::kGroup * Shape::kGroup * Count::kRow * Shape::kRow;
        if (state[2] == Count::kCluster) {
          state[2] = 0;
          start_row += Shape::kGroup * Shape::kRow * Shape::kCluster * Shape::kTile;
        }
      }
    }
    return start_row;
  }
};

template <typename Element>
std::vector<Element> random_matrix(size_t size, double mean, double spread, unsigned seed) {
  std::mt19937 random(seed);
  std::normal_distribution<double> normal(mean, spread);
  std::vector<Element> values(size);
  for (Element& v : values) v = Element(float(normal(random)));
  return values;
}

// Runs the epilogue of `Operator` (whose output op carries the reduction) on threadblock tile
// (tile_m, tile_n) of an extent_row x extent_column output holding `input`: returns what the
// threads store where (NaN where nothing is) and each tile column's merged state; counts
// failures of "stored exactly once".
template <typename Operator>
struct TileRun {
  using Epilogue = typename KernelOf<Operator>::Type::Epilogue;
  using Iterator = typename Epilogue::OutputTileIterator;
  using ThreadMap = typename Iterator::ThreadMap;
  using Gather = typename Iterator::Gather;
  using State = typename Gather::State;
  using Shape = typename Epilogue::Shape;
  using Element = typename Iterator::Element;
  using Params = typename Epilogue::OutputOp::Reduction::Params;

  std::vector<Element> stored;
  std::vector<State> merged;
  int rows = 0;

  TileRun(const char* name, const Params& params, const std::vector<Element>& input,
          int extent_row, int extent_column, int tile_m, int tile_n)
      : stored(input.size(), Element(NAN)) {
    using Iterations = typename ThreadMap::Iterations;
    using Delta = typename ThreadMap::Delta;
    constexpr int kAccess = ThreadMap::kElementsPerAccess;
    constexpr int kSlots = ThreadSlots<ThreadMap>::kSlots;
    const int row0 = tile_m * Shape::kM, column0 = tile_n * Shape::kN;
    rows = std::min(int(Shape::kM), extent_row - row0);
    std::vector<int> times(Shape::kM * Shape::kN, 0);
    std::vector<State> states(ThreadMap::kThreads * kSlots);
    for (int thread = 0; thread < ThreadMap::kThreads; ++thread) {
      const cutlass::MatrixCoord own = ThreadMap::initial_offset(thread);
      int start_row = row0 + own.row();
      const int start_column = column0 + own.column();
      Gather gather(params, start_column, extent_column);
      RowAdvance<ThreadMap> advance;
      for (int step = 0; step < Iterator::kIterations; ++step) {
        typename Iterator::Fragment fragment;
        for (int i = 0; i < Iterator::Fragment::kElements; ++i) fragment[i] = Element(NAN);
        // PredicatedTileIterator::store's loops: which fragment element goes where. Filled
        // from `input` before the gather, stored into `stored` after it.
        auto each_stored = [&](auto&& visit) {
          for (int cluster = 0; cluster < Iterations::kCluster; ++cluster) {
            for (int group = 0; group < Iterations::kGroup; ++group) {
              for (int row = 0; row < Iterations::kRow; ++row) {
                const int fragment_row =
                    row + Iterations::kRow * (group + Iterations::kGroup * cluster);
                const int r = start_row + row * Delta::kRow + group * Delta::kGroup +
                              cluster * Delta::kCluster;
                for (int column = 0; column < Iterations::kColumn; ++column) {
                  const int c = start_column + column * Delta::kColumn;
                  if (r >= extent_row || c >= extent_column) continue;
                  for (int e = 0; e < kAccess; ++e) {
                    visit((fragment_row * Iterations::kColumn + column) * kAccess + e,
                          size_t(r) * extent_column + c + e, r - row0, c + e - column0);
                  }
                }
              }
            }
          }
        };
        each_stored([&](int i, size_t at, int, int) { fragment[i] = input[at]; });
        gather(fragment, start_row, start_column, extent_row, extent_column);
        each_stored([&](int i, size_t at, int r, int c) {
          stored[at] = fragment[i];
          ++times[r * Shape::kN + c];
        });
        start_row = advance(start_row);
      }
      for (int s = 0; s < kSlots; ++s) states[thread * kSlots + s] = gather.slot[s];
    }
    for (int r = 0; r < Shape::kM; ++r) {
      for (int c = 0; c < Shape::kN; ++c) {
        const bool inside = row0 + r < extent_row && column0 + c < extent_column;
        if (times[r * Shape::kN + c] != (inside ? 1 : 0)) {
          fail("times stored", name, r, c, times[r * Shape::kN + c], inside);
        }
      }
    }
    for (int c = 0; c < Shape::kN && column0 + c < extent_column; ++c) {
      merged.push_back(merged_column<ThreadMap>(states.data(), c));
    }
  }
};

// OutputStatistics on `Operator` (an fprop kernel): output values mean + spread * N(0, 1).
template <typename Operator>
void check_statistics(const char* name, int extent_row, int extent_column, int tile_m,
                      int tile_n, double mean, double spread, unsigned seed) {
  using Run = TileRun<Operator>;
  using Shape = typename Run::Shape;
  const auto y = random_matrix<typename Run::Element>(size_t(extent_row) * extent_column, mean,
                                                      spread, seed);
  Run run(name, {nullptr}, y, extent_row, extent_column, tile_m, tile_n);
  const int row0 = tile_m * Shape::kM, column0 = tile_n * Shape::kN;
  for (size_t i = 0; i < y.size(); ++i) {
    if (!std::isnan(float(run.stored[i])) && float(run.stored[i]) != float(y[i])) {
      fail("stored value", name, int(i / extent_column), int(i % extent_column),
           float(run.stored[i]), float(y[i]));
    }
  }
  for (int c = 0; c < int(run.merged.size()); ++c) {
    double sum = 0, m2 = 0;
    for (int r = 0; r < run.rows; ++r) sum += double(y[size_t(row0 + r) * extent_column + column0 + c]);
    const double want_mean = sum / run.rows;
    for (int r = 0; r < run.rows; ++r) {
      const double d = double(y[size_t(row0 + r) * extent_column + column0 + c]) - want_mean;
      m2 += d * d;
    }
    const Welford got = run.merged[c];
    if (got.count != run.rows) fail("count", name, tile_m, c, got.count, run.rows);
    // fp32 Welford: the mean to a few ulps of |mean|. Each step rounds the running mean by
    // up to half an ulp of |mean|, which enters M2 times a deviation (about std): at most
    // rows * ulp(|mean|) * std in all, plus a few ulps of M2 itself; the deviations are
    // never squared whole (a sum of squares would lose rows * ulp(mean^2), all the digits
    // of a unit variance at |mean| = 1000).
    const double ulp = std::ldexp(1.0, -23);
    const double deviation = std::sqrt(m2 / run.rows);
    if (std::abs(got.mean - want_mean) > 8 * ulp * (std::abs(want_mean) + deviation)) {
      fail("mean", name, tile_m, c, got.mean, want_mean);
    }
    if (std::abs(got.m2 - m2) > run.rows * ulp * std::abs(want_mean) * deviation + 16 * ulp * m2) {
      fail("M2", name, tile_m, c, got.m2, m2);
    }
  }
}

// PrologueBackward on `Operator` (the BN-ReLU dgrad): g and x standard normal, scale of both
// signs, shift about 0.5.
template <typename Operator>
void check_prologue_backward(const char* name, int extent_row, int extent_column, int tile_m,
                             int tile_n, unsigned seed) {
  using Run = TileRun<Operator>;
  using Element = typename Run::Element;
  using Shape = typename Run::Shape;
  const size_t size = size_t(extent_row) * extent_column;
  const auto g = random_matrix<Element>(size, 0.0, 1.0, seed);
  const auto x = random_matrix<Element>(size, 0.0, 1.0, seed + 100);
  std::vector<float> scale(extent_column), shift(extent_column);
  std::mt19937 random(seed);
  std::uniform_real_distribution<float> uniform(0.5f, 1.5f);
  for (int c = 0; c < extent_column; ++c) {
    scale[c] = (c % 3 == 0 ? -1.f : 1.f) * uniform(random);
    shift[c] = uniform(random) - 1.f;
  }
  Run run(name, {x.data(), scale.data(), shift.data(), nullptr}, g, extent_row, extent_column,
          tile_m, tile_n);
  const int row0 = tile_m * Shape::kM, column0 = tile_n * Shape::kN;
  for (int c = 0; c < int(run.merged.size()); ++c) {
    const int channel = column0 + c;
    double sum = 0, dot = 0, magnitude = 0;
    for (int r = 0; r < run.rows; ++r) {
      const size_t at = size_t(row0 + r) * extent_column + channel;
      const float xe = float(x[at]);
      const float masked = xe * scale[channel] + shift[channel] > 0.f ? float(g[at]) : 0.f;
      const float want = float(Element(masked * scale[channel]));
      if (float(run.stored[at]) != want) fail("stored value", name, row0 + r, channel,
                                              float(run.stored[at]), want);
      sum += masked;
      dot += double(masked) * xe;
      magnitude += std::abs(masked) * (1 + std::abs(xe));
    }
    // fp32 sums of at most one tile's rows: each partial sum rounds by half an ulp of at most
    // the sum of magnitudes.
    const double bound = run.rows * std::ldexp(1.0, -24) * magnitude;
    const Sums got = run.merged[c];
    if (std::abs(got.sum - sum) > bound) fail("sum", name, tile_m, c, got.sum, sum);
    if (std::abs(got.dot - dot) > bound) fail("dot", name, tile_m, c, got.dot, dot);
    if (got.dot_residual != 0.f) fail("dot_residual", name, tile_m, c, got.dot_residual, 0);
  }
}

template <typename Operator>
void check_statistics_tiles(const char* name) {
  using Shape = typename TileRun<Operator>::Shape;
  // An interior tile; the last row tile cut short (37 rows) with K cut at 72 channels inside
  // the first column tile; a large |mean| / std; K = 8 (one access per row).
  check_statistics<Operator>(name, 3 * Shape::kM, 2 * Shape::kN, 1, 1, 0.5, 1.0, 1);
  check_statistics<Operator>(name, 2 * Shape::kM + 37, 72, 2, 0, -0.25, 2.0, 2);
  check_statistics<Operator>(name, 2 * Shape::kM, Shape::kN, 0, 0, 1000.0, 1.0, 3);
  check_statistics<Operator>(name, Shape::kM + 5, 8, 1, 0, 3.0, 0.5, 4);
}

template <typename Operator>
void check_prologue_backward_tiles(const char* name) {
  using Shape = typename TileRun<Operator>::Shape;
  check_prologue_backward<Operator>(name, 3 * Shape::kM, 2 * Shape::kN, 1, 1, 5);
  check_prologue_backward<Operator>(name, 2 * Shape::kM + 37, 72, 2, 0, 6);
  check_prologue_backward<Operator>(name, Shape::kM + 5, 8, 1, 0, 7);
}

template <typename Element, typename Tile>
void check_kernels(const char* element, const char* tile) {
  char name[96];
  std::snprintf(name, sizeof name, "%s %s fprop prologue", element, tile);
  check_statistics_tiles<typename FpropKernels<Element, Tile>::Prologue>(name);
  std::snprintf(name, sizeof name, "%s %s fprop statistics", element, tile);
  check_statistics_tiles<typename FpropKernels<Element, Tile>::Statistics>(name);
  std::snprintf(name, sizeof name, "%s %s dgrad prologue", element, tile);
  check_prologue_backward_tiles<typename BackwardKernels<Element, Tile>::PrologueDgrad>(name);
}

}  // namespace

int main() {
  check_kernels<cutlass::half_t, LargeTile>("fp16", "large");
  check_kernels<cutlass::half_t, SmallTile>("fp16", "small");
  check_kernels<cutlass::bfloat16_t, LargeTile>("bf16", "large");
  check_kernels<cutlass::bfloat16_t, SmallTile>("bf16", "small");
  if (failures != 0) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("epilogue reductions: every tile element stored and gathered once, "
              "transformed and merged as expected\n");
  return 0;
}
