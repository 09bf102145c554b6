// Runtime choice of the instruction set for the CPU kernels compiled once per ISA
// (isa_avx512.cpp, isa_avx2.cpp, isa_base.cpp; no -march=native in the build).
// EFFNET_CPU_ISA=avx2 or =base forces a narrower one (for tests and comparisons).
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#define EFFNET_CPU_X86 1
#endif

namespace effnet::cpu {

enum class Isa { Base, Avx2, Avx512 };

// The widest ISA this CPU supports (or the forced one), detected once.
Isa cpu_isa();

// "avx512", "avx2" or "base".
const char* isa_name();

// The one of three per-ISA implementations that cpu_isa() selects.
template <class F>
F pick_isa(F f_avx512, F f_avx2, F f_base) {
  switch (cpu_isa()) {
    case Isa::Avx512: return f_avx512;
    case Isa::Avx2: return f_avx2;
    default: return f_base;
  }
}

}  // namespace effnet::cpu

// pick_isa over the functions `ns::fn` of the per-ISA namespaces ns::avx512/avx2/base.
#ifdef EFFNET_CPU_X86
#define EFFNET_PICK_ISA(ns, fn) ::effnet::cpu::pick_isa(&ns::avx512::fn, &ns::avx2::fn, &ns::base::fn)
#else
#define EFFNET_PICK_ISA(ns, fn) ::effnet::cpu::pick_isa(&ns::base::fn, &ns::base::fn, &ns::base::fn)
#endif
