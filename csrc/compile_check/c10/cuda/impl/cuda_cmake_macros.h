// Stand-in for the generated header that CPU-only torch wheels lack. Used ONLY on the include path
// of the syntax check of csrc/spot_ops_cuda.cpp (tests/ops/test_compile_check.py); real CUDA builds
// use the header shipped by the CUDA torch wheel.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
