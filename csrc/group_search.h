// Exact task-grouping search: TAG's network selection rule (Fifty et al., 2021) and HOA's
// (Standley et al., 2020) on an affinity / pairwise-loss matrix, by branch and bound.
//
// The rule, in "maximise" form (HOA is the same search on negated predicted losses):
//   every non-empty subset S of the K tasks is a candidate group; member a of S scores
//     TAG: mean over b in S\{a} of Z[b, a]          (singleton: -1e6)
//     HOA: -(mean over b in S\{a} of P[a, b])       (singleton: -P[a, a])
//   sums run over b in increasing order, then divide by |S| - 1 (mtdl_fast/grouping.py scores the
//   chosen groups with the same float64 operations in the same order, so the scores agree bit for bit).
//   A collection of at most `budget` distinct subsets is feasible if it covers every task; its total
//   is the sum, over tasks in index order, of each task's best score in the collection; value =
//   total / K. The answer is the first collection, in the exhaustive enumeration order (fewer groups
//   first, then lexicographic in the bitmasks), whose total reaches the optimum up to float noise
//   (see group_search.cpp: "ties").
//
// Memory: 8 K 2^K bytes for the score table, 8 min(budget, K) 2^K bytes for the partition tables
// and 12 2^K bytes of scratch: K = 16 -> ~11 MB, K = 20 -> ~210 MB (budget 4).
// Time: dominated by the partition tables, O(min(budget, K) 3^K) (one core, measured on an EPYC):
// < 1 ms for K <= 10, ~3 ms for K = 12, ~0.2-0.3 s for K = 16, ~2 s for K = 18, ~20 s for K = 20.
#pragma once

#include <cstdint>
#include <vector>

#ifndef __CUDACC__
#include <ATen/core/Tensor.h>

#include <tuple>
#endif

namespace mtdl {

constexpr int kGroupSearchMaxTasks = 20;

struct GroupSearchOutput {
  double value = 0.0;           // total / K of the answer (the optimum, in the rule's own sign for TAG;
                                // for HOA the caller negates: value here is in maximise form)
  double total = 0.0;           // sum over tasks, maximise form
  std::vector<int64_t> groups;  // bitmasks of the chosen subsets, increasing
  int64_t nodes = 0;            // branch-and-bound nodes visited (children bounded + leaves evaluated)
  double bound = 0.0;           // the partition-DP optimum (maximise form): the proven upper bound
};

// M: K x K row-major float64, finite. budget >= 1. minimize=false: TAG rule on an affinity matrix;
// minimize=true: HOA rule on a pairwise-loss matrix. Throws std::invalid_argument on bad input.
GroupSearchOutput group_search(const double* M, int K, int64_t budget, bool minimize);

#ifndef __CUDACC__
// Torch-facing wrapper: matrix (K, K) real tensor on any device (copied to CPU float64), returns
// (value, groups as bitmasks, nodes) with value in the rule's own sign (HOA: the minimum mean loss).
// Releases the GIL during the search.
std::tuple<double, std::vector<int64_t>, int64_t> select_groups(const at::Tensor& matrix, int64_t budget,
                                                                bool minimize);
#endif

}  // namespace mtdl
