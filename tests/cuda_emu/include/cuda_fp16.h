// __half and __nv_bfloat16 of the CUDA host emulation (tests/cuda_emu).  Storage is the IEEE bit
// pattern; conversions from float round to nearest even (NaN stays NaN, overflow goes to inf), as
// the device's cvt.rn does; arithmetic is done in float and rounded back, like the device's
// half-precision instructions for single operations.
#pragma once

#include "kkemu.h"

#include <cstdint>
#include <cstring>
#include <cmath>

namespace kkemu {
inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float f32_from(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline uint16_t f32_to_f16_rn(float f) {
  const uint32_t x = f32_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u)  // inf, or NaN (kept quiet, top payload bits kept)
    return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u | ((ax >> 13) & 0x3ffu) : 0u));
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {  // below 2^-14: a multiple of 2^-24 (subnormal) after rounding
    const float scaled = f32_from(ax) * 16777216.0f;  // exact: scaling by a power of two
    return (uint16_t)(sign | (uint32_t)std::nearbyint(scaled));  // nearest even (default mode)
  }
  uint32_t h = ((((ax >> 23) - 127u + 15u) << 10) | ((ax >> 13) & 0x3ffu));
  const uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is right
  return (uint16_t)(sign | h);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    const float v = std::ldexp((float)m, -24);
    return sign ? -v : v;
  }
  if (e == 31) return f32_from(sign | 0x7f800000u | (m << 13));
  return f32_from(sign | ((e - 15u + 127u) << 23) | (m << 13));
}

inline uint16_t f32_to_bf16_rn(float f) {
  const uint32_t x = f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);  // quiet NaN
  return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
inline float bf16_to_f32(uint16_t b) { return f32_from((uint32_t)b << 16); }
}  // namespace kkemu

struct __half_raw { unsigned short x; };
struct __nv_bfloat16_raw { unsigned short x; };

struct __align__(2) __half {
  unsigned short __x;
  __half() = default;
  __half(const __half_raw& r) : __x(r.x) {}
  __half(float f) : __x(kkemu::f32_to_f16_rn(f)) {}
  __half(double f) : __x(kkemu::f32_to_f16_rn((float)f)) {}
  __half(int v) : __x(kkemu::f32_to_f16_rn((float)v)) {}
  operator float() const { return kkemu::f16_to_f32(__x); }
  operator __half_raw() const { return __half_raw{__x}; }
};

struct __align__(2) __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(const __nv_bfloat16_raw& r) : __x(r.x) {}
  __nv_bfloat16(float f) : __x(kkemu::f32_to_bf16_rn(f)) {}
  __nv_bfloat16(double f) : __x(kkemu::f32_to_bf16_rn((float)f)) {}
  __nv_bfloat16(int v) : __x(kkemu::f32_to_bf16_rn((float)v)) {}
  operator float() const { return kkemu::bf16_to_f32(__x); }
  operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
};
typedef __half half;
typedef __nv_bfloat16 nv_bfloat16;

struct __align__(4) __half2 { __half x, y; };
struct __align__(4) __nv_bfloat162 { __nv_bfloat16 x, y; };
typedef __half2 half2;
typedef __nv_bfloat162 nv_bfloat162;

// ---- conversions ------------------------------------------------------------------------------
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return kkemu::f16_to_f32(h.__x); }
inline __half __ushort_as_half(unsigned short v) { return __half(__half_raw{v}); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __int2half_rn(int v) { return __half((float)v); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return kkemu::bf16_to_f32(b.__x); }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short v) { return __nv_bfloat16(__nv_bfloat16_raw{v}); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }

inline __half2 __floats2half2_rn(float a, float b) { return __half2{__half(a), __half(b)}; }
inline __half2 __float2half2_rn(float a) { return __half2{__half(a), __half(a)}; }
inline __half2 __float22half2_rn(float2 v) { return __floats2half2_rn(v.x, v.y); }
inline float2 __half22float2(__half2 h) { return make_float2(__half2float(h.x), __half2float(h.y)); }
inline __half2 __halves2half2(__half a, __half b) { return __half2{a, b}; }
inline __half2 make_half2(__half a, __half b) { return __half2{a, b}; }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return __nv_bfloat162{__nv_bfloat16(a), __nv_bfloat16(b)}; }
inline __nv_bfloat162 __float2bfloat162_rn(float a) { return __floats2bfloat162_rn(a, a); }
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 h) {
  return make_float2(__bfloat162float(h.x), __bfloat162float(h.y));
}
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162{a, b}; }
inline __nv_bfloat162 make_bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162{a, b}; }
inline float __low2float(__nv_bfloat162 h) { return __bfloat162float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return __bfloat162float(h.y); }

// ---- arithmetic: computed in float (fma in double), rounded once ------------------------------
#define KKEMU_HALF_OPS(T, P)                                                                      \
  inline T __h##P##add(T a, T b) { return T((float)a + (float)b); }                               \
  inline T __h##P##sub(T a, T b) { return T((float)a - (float)b); }                               \
  inline T __h##P##mul(T a, T b) { return T((float)a * (float)b); }                               \
  inline T __h##P##div(T a, T b) { return T((float)a / (float)b); }                               \
  inline T __h##P##fma(T a, T b, T c) { return T((float)((double)(float)a * (float)b + (float)c)); } \
  inline T __h##P##neg(T a) { T r = a; r.__x ^= 0x8000u; return r; }                            \
  inline T __h##P##max(T a, T b) { return T(fmaxf((float)a, (float)b)); }                         \
  inline T __h##P##min(T a, T b) { return T(fminf((float)a, (float)b)); }                         \
  inline bool __h##P##isnan(T a) { return std::isnan((float)a); }                                 \
  inline T operator+(T a, T b) { return __h##P##add(a, b); }                                      \
  inline T operator-(T a, T b) { return __h##P##sub(a, b); }                                      \
  inline T operator*(T a, T b) { return __h##P##mul(a, b); }                                      \
  inline T operator/(T a, T b) { return __h##P##div(a, b); }                                      \
  inline T operator-(T a) { return __h##P##neg(a); }                                              \
  inline T& operator+=(T& a, T b) { return a = a + b; }                                           \
  inline T& operator-=(T& a, T b) { return a = a - b; }                                           \
  inline T& operator*=(T& a, T b) { return a = a * b; }                                           \
  inline bool operator==(T a, T b) { return (float)a == (float)b; }                               \
  inline bool operator!=(T a, T b) { return (float)a != (float)b; }                               \
  inline bool operator<(T a, T b) { return (float)a < (float)b; }                                 \
  inline bool operator>(T a, T b) { return (float)a > (float)b; }                                 \
  inline bool operator<=(T a, T b) { return (float)a <= (float)b; }                               \
  inline bool operator>=(T a, T b) { return (float)a >= (float)b; }
// __hadd/__hmul/... for __half; __hadd for bfloat16 shares the names in CUDA (overloads).
KKEMU_HALF_OPS(__half, )
KKEMU_HALF_OPS(__nv_bfloat16, )
#undef KKEMU_HALF_OPS
inline __half2 __hadd2(__half2 a, __half2 b) { return __half2{a.x + b.x, a.y + b.y}; }
inline __half2 __hmul2(__half2 a, __half2 b) { return __half2{a.x * b.x, a.y * b.y}; }
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) { return __half2{__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)}; }
inline __nv_bfloat162 __hadd2(__nv_bfloat162 a, __nv_bfloat162 b) { return __nv_bfloat162{a.x + b.x, a.y + b.y}; }
inline __nv_bfloat162 __hmul2(__nv_bfloat162 a, __nv_bfloat162 b) { return __nv_bfloat162{a.x * b.x, a.y * b.y}; }
inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
  return __nv_bfloat162{__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)};
}
