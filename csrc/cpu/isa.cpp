// CPU ISA detection for the per-ISA kernels (see isa.h).
#include "isa.h"

#include <cstdlib>
#include <string>

namespace effnet::cpu {
namespace {

Isa detect_isa() {
  const char* env = std::getenv("EFFNET_CPU_ISA");
  const std::string forced = env ? env : "";
  if (forced == "base") return Isa::Base;
#ifdef EFFNET_CPU_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (avx512 && forced != "avx2") return Isa::Avx512;
  if (avx2) return Isa::Avx2;
#endif
  return Isa::Base;
}

}  // namespace

Isa cpu_isa() {
  static const Isa chosen = detect_isa();
  return chosen;
}

const char* isa_name() {
  switch (cpu_isa()) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "base";
  }
}

}  // namespace effnet::cpu
