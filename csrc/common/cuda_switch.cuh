// Static switches: turn a runtime value into a compile-time template argument, so that one templated
// kernel covers every bit width (never a copy of a kernel per bit width). Torch-free.
//
//   return bits_switch<2, 3, 4, 8>(bits, [&](auto bits_c) {
//     constexpr int BITS = decltype(bits_c)::value;
//     return launch<BITS>(...);
//   }, on_unknown);
#pragma once

#include <type_traits>

namespace qbert::cuda {

// Calls f(std::integral_constant<int, V>{}) for the V in kValues equal to `value`, else on_unknown().
template <int... kValues, class F, class Otherwise>
auto bits_switch(int value, F&& f, Otherwise&& on_unknown) {
  using Result = decltype(on_unknown());
  Result result{};
  const bool found = ((value == kValues ? (result = f(std::integral_constant<int, kValues>{}), true) : false) || ...);
  return found ? result : on_unknown();
}

}  // namespace qbert::cuda
