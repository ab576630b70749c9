// Exact task-grouping search (TAG network selection / HOA) by branch and bound over collections of
// subsets, with a set-partition dynamic program as the bound: the one implementation of the exact
// search. mtdl_fast/grouping.py holds the exhaustive reference it is tested against and scores the
// chosen groups with the same float64 operations in the same order.
//
// ---- notation (maximise form) ------------------------------------------------------------------
// sc[S][a]: score of task a in subset S (-inf when a is not in S). A collection C covers every task;
// its total is f(C) = sum_a x_a with x_a = max_{S in C} sc[S][a], summed over a in increasing order.
//
// ---- the bound ---------------------------------------------------------------------------------
// Partition view. Given an optimal C, the tasks served by each group form a partition of the task
// set into <= |C| blocks, block T served by S ⊇ T. Let w(T) = max_{S ⊇ T} sum_{a in T} sc[S][a]
// (the best one group can do for exactly the tasks T) and h_r(U) = the best sum of w over partitions
// of U into at most r blocks (h_r(∅) = 0, h_0(U ≠ ∅) = -inf). Then
//     max_{|C| <= r, C covers U} sum_{a in U} x_a  =  h_r(U)                                   (1)
// ("<=": serving blocks; ">=": take for each block its argmax group; groups met twice merge, which
// only frees a slot). So h_b(all) is the optimum total itself (up to float rounding), computed in
// O(b 3^K) by  h_r(U) = max_{T ⊆ U, T ∋ min U} w(T) + h_{r-1}(U \ T).
//
// Inside the search, a node is a prefix P of groups (increasing bitmasks), with r slots left, the
// covered tasks' current scores cur_a and the uncovered set U. Any completion R (|R| <= r) ends with
//     f = sum_{a not in D} cur_a + sum_{a in D} y_a,   D = U ∪ {covered a whose score R raises},
// and the tasks of D are served by R, so by (1)
//     f <= max_{E ⊆ I} [ sum_{cov \ E} cur_a + h_r(U ∪ E) ],   I = {covered a : best_a > cur_a}  (2)
// where best_a = max_S sc[S][a] is task a's best reachable score. Whether the max over E reaches
// the threshold is itself decided by a small depth-first search over I (largest deficit
// best_a - cur_a first, see may_reach), pruned with
//     h_r(X ∪ Y) <= h_r(X) + sum_{a in Y} best_a                                               (3)
// (drop Y's tasks from each block: w(T \ Y) >= w(T) - sum_{T ∩ Y} best). At E = ∅ with (3), (2)
// gives the per-task bound  sum_{cov} max(cur_a, best_a) + h_r(U) <= sum_a max(cur_a, best_a):
// each task's best still-reachable score, tightened by the DP for the uncovered tasks. Coverage:
// with r = 0 left, h_0(U ≠ ∅) = -inf prunes; in the last slot only supersets of U are tried.
// (The sum of the r best per-subset gains, valid by submodularity of f, is dominated by (2) here in
// practice and costs O(2^K K) per node, so it is not used.)
//
// ---- order, ties, float --------------------------------------------------------------------------
// The search runs passes m = 1, 2, ..., min(budget, K) (exactly m groups), each a depth-first search
// over increasing bitmasks: the exhaustive enumeration order (itertools.combinations over masks
// 1..2^K-1, sizes 1..budget). It returns the FIRST leaf whose float total reaches
// theta = h_b(all) - tau, tau = 8 (K + b + 2) u A (u = 2^-53, A a bound on sum_a |x_a| for
// collections near the optimum): collections within float noise of the optimum are ties and the
// first one in enumeration order wins, i.e. "first found wins ties". An optimal collection never
// needs more than K groups (each task is served by one), so passes stop at min(budget, K).
// Pruning compares each bound with theta - tol, tol = gamma (the magnitudes that enter that bound's
// sums + A), gamma = 8 (K + b + 2) u: more than their rounding, so no collection with total >= theta
// is ever cut. theta is also capped by the float total of the collection rebuilt from the DP, so a
// qualifying leaf always exists.
#include "group_search.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>

namespace mtdl {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kTagSingleton = -1e6;
constexpr double kUnit = DBL_EPSILON / 2;  // u = 2^-53
constexpr double kMaxMagnitude = 1e100;     // larger entries could overflow the float64 sums

inline int popcount32(uint32_t x) { return __builtin_popcount(x); }
inline int highbit32(uint32_t x) { return 31 - __builtin_clz(x); }

class Search {
 public:
  Search(const double* M, int K, int64_t budget, bool minimize)
      : K_(K), N_(uint32_t(1) << K), full_((uint32_t(1) << K) - 1) {
    maxr_ = int(std::min<int64_t>(budget, K));
    build_scores(M, minimize);
    build_dp();
  }

  GroupSearchOutput run() {
    GroupSearchOutput out;
    const double v = h(maxr_, full_);
    out.bound = v;
    // tolerances (see the header comment)
    double sum_best = 0.0;
    for (int a = 0; a < K_; ++a) sum_best += best_[a];
    double A = 0.0, mabs_sum = 0.0;
    for (int a = 0; a < K_; ++a) {
      A += std::max(std::fabs(best_[a]), std::fabs(v - (sum_best - best_[a])));
      mabs_sum += mabs_[a];
    }
    const double gamma = 8.0 * double(K_ + maxr_ + 2) * kUnit;
    const double tau = gamma * A;
    base_tol_ = gamma * (A + mabs_sum);
    gamma_ = gamma;
    A_ = A;
    theta_ = std::min(v - tau, dp_collection_total());

    cur_.assign(size_t(K_ + 1) * K_, -kInf);
    chosen_.assign(K_ + 1, 0);
    nodes_ = 0;
    bool found = false;
    for (int m = 1; m <= maxr_ && !found; ++m) {
      if (h(m, full_) < theta_ - base_tol_) continue;  // no m-collection reaches theta
      found = dfs(0, 0, full_, m);
    }
    TORCH_CHECK(found, "group_search: internal error, no collection reached the DP optimum");
    out.total = found_total_;
    out.value = found_total_ / double(K_);
    out.groups.assign(found_groups_.begin(), found_groups_.end());
    out.nodes = nodes_;
    return out;
  }

 private:
  // ---- tables ------------------------------------------------------------------------------------

  void build_scores(const double* M, bool minimize) {
    // raw[S][a] = sum over c in S, c != a, increasing, of X[c][a]; X = Z (TAG) or P^T (HOA).
    sc_.assign(size_t(N_) * K_, 0.0);
    std::vector<double> row(K_);
    for (int t = 0; t < K_; ++t) {
      for (int a = 0; a < K_; ++a) row[a] = (a == t) ? 0.0 : (minimize ? M[a * K_ + t] : M[t * K_ + a]);
      const uint32_t lo = uint32_t(1) << t;
      for (uint32_t s = 0; s < lo; ++s) {
        const double* src = &sc_[size_t(s) * K_];
        double* dst = &sc_[size_t(s | lo) * K_];
        for (int a = 0; a < K_; ++a) dst[a] = src[a] + row[a];
      }
    }
    best_.assign(K_, -kInf);
    mabs_.assign(K_, 0.0);
    for (uint32_t S = 0; S < N_; ++S) {
      double* r = &sc_[size_t(S) * K_];
      const int pc = popcount32(S);
      for (int a = 0; a < K_; ++a) {
        if (!((S >> a) & 1u)) {
          r[a] = -kInf;
          continue;
        }
        double s;
        if (pc == 1) {
          s = minimize ? -M[a * K_ + a] : kTagSingleton;
        } else {
          s = r[a] / double(pc - 1);
          if (minimize) s = -s;
        }
        r[a] = s;
        best_[a] = std::max(best_[a], s);
        if (pc >= 2) mabs_[a] = std::max(mabs_[a], std::fabs(s));
      }
    }
    // mabs_[a] bounds |score| of a in any block of a DP partition: blocks of >= 2 tasks are served
    // by groups of >= 2, a lone block {a} is worth best_a.
    for (int a = 0; a < K_; ++a) mabs_[a] = std::max(mabs_[a], std::fabs(best_[a]));
  }

  void build_dp() {
    // w(T) = max_{S ⊇ T} sum_{a in T, increasing} sc[S][a]
    std::vector<double> w(N_, -kInf);
    w[0] = 0.0;
    std::vector<double> tsum(N_);
    std::vector<uint32_t> tmask(N_);
    int bits[32];
    tsum[0] = 0.0;
    tmask[0] = 0;
    for (uint32_t S = 1; S < N_; ++S) {
      int m = 0;
      for (int a = 0; a < K_; ++a)
        if ((S >> a) & 1u) bits[m++] = a;
      const double* r = &sc_[size_t(S) * K_];
      const uint32_t n = uint32_t(1) << m;
      for (uint32_t i = 1; i < n; ++i) {
        const int hb = highbit32(i);
        const uint32_t j = i ^ (uint32_t(1) << hb);
        const uint32_t T = tmask[j] | (uint32_t(1) << bits[hb]);
        const double s = tsum[j] + r[bits[hb]];
        tmask[i] = T;
        tsum[i] = s;
        if (s > w[T]) w[T] = s;
      }
    }
    // h_1 = w; h_r(U) = max_{T ⊆ U, T ∋ low(U)} w(T) + h_{r-1}(U \ T), r = 2 .. maxr - 1 as tables
    // and h_maxr(all) alone.
    h_.clear();
    h_.push_back(std::move(w));
    for (int r = 2; r <= maxr_; ++r) {
      const std::vector<double>& w1 = h_[0];
      const std::vector<double>& prev = h_[r - 2];
      if (r < maxr_) {
        std::vector<double> cur(N_, -kInf);
        cur[0] = 0.0;
        for (uint32_t U = 1; U < N_; ++U) cur[U] = split_max(U, w1, prev);
        h_.push_back(std::move(cur));
      } else {
        h_top_ = split_max(full_, w1, prev);
      }
    }
    if (maxr_ == 1) h_top_ = h_[0][full_];
  }

  static double split_max(uint32_t U, const std::vector<double>& w, const std::vector<double>& prev) {
    const uint32_t low = U & (~U + 1);
    const uint32_t rest = U ^ low;
    double v = -kInf;
    uint32_t R = rest;
    while (true) {  // all submasks R of rest
      const uint32_t T = low | R;
      const double c = w[T] + prev[U ^ T];
      if (c > v) v = c;
      if (R == 0) break;
      R = (R - 1) & rest;
    }
    return v;
  }

  // h_r(U), r >= 0
  double h(int r, uint32_t U) const {
    if (U == 0) return 0.0;
    if (r <= 0) return -kInf;
    if (r < maxr_ || (maxr_ == 1 && r == 1)) return h_[r - 1][U];
    // r >= maxr: only h_maxr(all) is kept (the search never asks for more)
    TORCH_CHECK(r == maxr_ && U == full_, "group_search: internal error, h_", r, " not tabled");
    return h_top_;
  }

  // Float total of the collection rebuilt from the DP (a feasible collection of <= budget groups).
  double dp_collection_total() {
    std::vector<uint32_t> groups;
    uint32_t U = full_;
    int r = maxr_;
    double target = h(r, U);
    while (U != 0) {
      const uint32_t low = U & (~U + 1);
      const uint32_t rest = U ^ low;
      uint32_t R = rest, pick = 0;
      bool ok = false;
      while (true) {
        const uint32_t T = low | R;
        if (r == 1 ? T == U : true) {
          const double c = (r == 1) ? h_[0][T] : h_[0][T] + h(r - 1, U ^ T);
          if (c == target) {
            pick = T;
            ok = true;
            break;
          }
        }
        if (R == 0) break;
        R = (R - 1) & rest;
      }
      TORCH_CHECK(ok, "group_search: internal error rebuilding the DP partition");
      // the group serving block `pick`: the first S ⊇ pick attaining w(pick)
      const uint32_t free = full_ ^ pick;
      uint32_t X = 0;
      bool got = false;
      while (true) {
        const uint32_t S = pick | X;
        const double* row = &sc_[size_t(S) * K_];
        double s = 0.0;
        for (int a = 0; a < K_; ++a)
          if ((pick >> a) & 1u) s += row[a];
        if (s == h_[0][pick]) {
          groups.push_back(S);
          got = true;
          break;
        }
        if (X == free) break;
        X = (X - free) & free;
      }
      TORCH_CHECK(got, "group_search: internal error rebuilding a DP group");
      U ^= pick;
      if (U != 0) target = h(r - 1, U);
      --r;
    }
    std::vector<double> x(K_, -kInf);
    for (uint32_t S : groups)
      for (int a = 0; a < K_; ++a) x[a] = std::max(x[a], sc_[size_t(S) * K_ + a]);
    double t = 0.0;
    for (int a = 0; a < K_; ++a) t += x[a];
    return t;
  }

  // ---- branch and bound --------------------------------------------------------------------------

  // depth d: chosen_[0..d) fixed, cur_ row d holds the current scores (-inf: uncovered), U the
  // uncovered tasks, r >= 1 slots left in this pass. Returns true when the answer was found.
  bool dfs(int d, uint32_t last, uint32_t U, int r) {
    const double* cur = &cur_[size_t(d) * K_];
    if (r == 1) {
      // last slot: supersets S of U with S > last, increasing
      uint32_t S = last + 1;
      const uint32_t miss = U & ~S;
      if (miss) {
        const int p = highbit32(miss);
        S = (((S >> p) | 1u) << p) | (U & ((uint32_t(1) << p) - 1));
      }
      for (; S <= full_; S = (S + 1) | U) {
        ++nodes_;
        const double* row = &sc_[size_t(S) * K_];
        double t = 0.0;
        for (int a = 0; a < K_; ++a) t += std::max(cur[a], row[a]);
        if (t >= theta_) {
          chosen_[d] = S;
          found_total_ = t;
          found_groups_.assign(chosen_.begin(), chosen_.begin() + d + 1);
          return true;
        }
        if (S == full_) break;
      }
      return false;
    }
    double* nxt = &cur_[size_t(d + 1) * K_];
    const uint32_t stop = N_ - uint32_t(r);  // r - 1 more distinct masks above S must exist
    for (uint32_t S = last + 1; S <= stop; ++S) {
      ++nodes_;
      const double* row = &sc_[size_t(S) * K_];
      for (int a = 0; a < K_; ++a) nxt[a] = std::max(cur[a], row[a]);
      const uint32_t U2 = U & ~S;
      if (!may_reach(nxt, U2, r - 1)) continue;
      chosen_[d] = S;
      if (dfs(d + 1, S, U2, r - 1)) return true;
    }
    return false;
  }

  // Bound (2) >= theta (up to rounding)? (r >= 1)
  //
  // The covered tasks split into the settled ones (cur_a >= best_a: never re-served) and I, sorted
  // by deficit best_a - cur_a, largest first (a task stuck on a -1e6 singleton comes first), ties by
  // task index. A depth-first search decides, task by task, whether a is in E. At a node with E_in
  // decided and R = the undecided rest, X = U ∪ E_in and acc = sum of cur over the settled and the
  // excluded tasks:
  //   any E in the subtree:  value(E) <= acc + h_r(X) + sum_{a in R} best_a     (by (3))
  //   E = E_in itself:       value    =  acc + h_r(X) + sum_{a in R} cur_a
  // Scores are only ever added (never added and subtracted again), so a -1e6 singleton score
  // enters a sum only where it sinks that sum, and each test allows for the rounding of the
  // magnitudes it adds: tol = gamma (A + sum_{X} mabs + sum |acc terms| + sum_{R} |best|).
  bool may_reach(const double* c, uint32_t U, int r) {
    double acc = 0.0, accabs = 0.0, mabsx = 0.0;
    int n = 0;
    for (int a = 0; a < K_; ++a) {
      if ((U >> a) & 1u) {
        mabsx += mabs_[a];
        continue;
      }
      if (best_[a] > c[a]) {
        def_[n] = best_[a] - c[a];
        ord_[n] = a;
        ++n;
      } else {
        acc += c[a];
        accabs += std::fabs(c[a]);
      }
    }
    // largest deficit first; ties by task index (stable insertion sort)
    for (int i = 1; i < n; ++i) {
      const double dv = def_[i];
      const int av = ord_[i];
      int j = i - 1;
      while (j >= 0 && def_[j] < dv) {
        def_[j + 1] = def_[j];
        ord_[j + 1] = ord_[j];
        --j;
      }
      def_[j + 1] = dv;
      ord_[j + 1] = av;
    }
    sufbest_[n] = sufcur_[n] = sufbabs_[n] = 0.0;
    for (int i = n - 1; i >= 0; --i) {
      const int a = ord_[i];
      sufbest_[i] = best_[a] + sufbest_[i + 1];
      sufcur_[i] = c[a] + sufcur_[i + 1];
      sufbabs_[i] = std::fabs(best_[a]) + sufbabs_[i + 1];
    }
    n_ = n;
    c_ = c;
    r_ = r;
    return esearch(0, U, acc, accabs, mabsx);
  }

  bool esearch(int i, uint32_t X, double acc, double accabs, double mabsx) {
    const double s = acc + h(r_, X);
    const double target = theta_ - gamma_ * (A_ + (mabsx + (accabs + sufbabs_[i])));
    if (s + sufcur_[i] >= target) return true;   // E = E_in reaches theta: the node stays
    if (s + sufbest_[i] < target) return false;  // nothing below reaches it: prune
    if (i == n_) return false;
    const int a = ord_[i];
    if (esearch(i + 1, X | (uint32_t(1) << a), acc, accabs, mabsx + mabs_[a])) return true;
    return esearch(i + 1, X, acc + c_[a], accabs + std::fabs(c_[a]), mabsx);
  }

  int K_;
  uint32_t N_, full_;
  int maxr_ = 1;
  std::vector<double> sc_, best_, mabs_;
  std::vector<std::vector<double>> h_;  // h_[r-1] = h_r, r = 1 .. maxr-1 (h_[0] = w = h_1)
  double h_top_ = 0.0;                  // h_maxr(all)
  double theta_ = 0.0, base_tol_ = 0.0, gamma_ = 0.0, A_ = 0.0;
  std::vector<double> cur_;
  std::vector<uint32_t> chosen_;
  int64_t nodes_ = 0;
  double found_total_ = 0.0;
  std::vector<uint32_t> found_groups_;
  // scratch of may_reach / esearch
  double def_[kGroupSearchMaxTasks + 1];
  double sufbest_[kGroupSearchMaxTasks + 2], sufcur_[kGroupSearchMaxTasks + 2], sufbabs_[kGroupSearchMaxTasks + 2];
  int ord_[kGroupSearchMaxTasks + 1];
  int n_ = 0, r_ = 0;
  const double* c_ = nullptr;
};

}  // namespace

GroupSearchOutput group_search(const double* M, int K, int64_t budget, bool minimize) {
  if (K < 1 || K > kGroupSearchMaxTasks)
    throw std::invalid_argument("group_search: the exact search supports 1 <= K <= " +
                                std::to_string(kGroupSearchMaxTasks) + " tasks, got K = " + std::to_string(K));
  if (budget < 1) throw std::invalid_argument("group_search: budget must be >= 1, got " + std::to_string(budget));
  for (int i = 0; i < K * K; ++i) {
    if (!std::isfinite(M[i])) throw std::invalid_argument("group_search: the matrix has non-finite entries");
    if (std::fabs(M[i]) > kMaxMagnitude)
      throw std::invalid_argument("group_search: matrix entries must have magnitude <= 1e100 (sums must not overflow)");
  }
  Search search(M, K, budget, minimize);
  GroupSearchOutput out = search.run();
  if (minimize) {
    out.value = -out.value;
    out.total = -out.total;
    out.bound = -out.bound;
  }
  return out;
}

std::tuple<double, std::vector<int64_t>, int64_t> select_groups(const at::Tensor& matrix, int64_t budget,
                                                                bool minimize) {
  TORCH_CHECK(matrix.dim() == 2 && matrix.size(0) == matrix.size(1),
              "select_groups: matrix must be square (K, K), got ", matrix.sizes());
  const int64_t K = matrix.size(0);
  TORCH_CHECK(K >= 1 && K <= kGroupSearchMaxTasks, "select_groups: the exact search supports 1 <= K <= ",
              kGroupSearchMaxTasks, " tasks, got K = ", K);
  TORCH_CHECK(budget >= 1, "select_groups: budget must be >= 1, got ", budget);
  TORCH_CHECK(!matrix.is_complex(), "select_groups: matrix must be real");
  const at::Tensor m = matrix.detach().to(at::kCPU, at::kDouble).contiguous();
  std::vector<double> data(m.data_ptr<double>(), m.data_ptr<double>() + K * K);
  for (double x : data) {
    TORCH_CHECK(std::isfinite(x), "select_groups: matrix has non-finite entries");
    TORCH_CHECK(std::fabs(x) <= kMaxMagnitude, "select_groups: matrix entries must have magnitude <= 1e100, got ", x);
  }
  GroupSearchOutput out;
  try {
    out = group_search(data.data(), int(K), budget, minimize);
  } catch (const std::bad_alloc&) {
    const double mb =
        (8.0 * double(K) + 8.0 * double(std::min<int64_t>(budget, K)) + 12.0) * double(int64_t(1) << K) / 1e6;
    TORCH_CHECK(false, "select_groups: out of memory for K = ", K, " (the tables need about ", mb, " MB)");
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, e.what());
  }
  return {out.value, out.groups, out.nodes};
}

}  // namespace mtdl
