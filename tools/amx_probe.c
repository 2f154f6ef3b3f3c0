// Can this process run AMX-INT8 tiles, and how fast is one core? (edgeq issue 4, x86-amx)
//   gcc -O2 -mamx-tile -mamx-int8 -o /tmp/amx_probe tools/amx_probe.c && /tmp/amx_probe
// CPUID and XCR0 tile bits, Linux tile permission, then a chain of TDPBSSD on one tile (a
// throughput floor: the accumulator dependency keeps it below the 1024 MAC/cycle peak).
#include <immintrin.h>
#include <cpuid.h>
#include <stdio.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
#define ARCH_GET_XCOMP_PERM 0x1022
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XTILEDATA 18
typedef struct { uint8_t palette, start_row, r[14]; uint16_t colsb[16]; uint8_t rows[16]; } cfg_t;
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
int main(void) {
  unsigned a, b, c, d;
  __cpuid_count(7, 0, a, b, c, d);
  printf("cpuid.7.0 edx: amx_bf16=%u amx_tile=%u amx_int8=%u; ecx avx512_vnni=%u\n", (d >> 22) & 1, (d >> 24) & 1, (d >> 25) & 1, (c >> 11) & 1);
  __cpuid_count(1, 0, a, b, c, d);
  int osxsave = (c >> 27) & 1;
  unsigned long long xcr0 = 0;
  if (osxsave) { unsigned lo, hi; __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0)); xcr0 = ((unsigned long long)hi << 32) | lo; }
  printf("osxsave=%d xcr0=0x%llx xtilecfg(bit17)=%llu xtiledata(bit18)=%llu\n", osxsave, xcr0, (xcr0 >> 17) & 1, (xcr0 >> 18) & 1);
  unsigned long perm = 0;
  long r1 = syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &perm);
  long r2 = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XTILEDATA);
  unsigned long perm2 = 0; syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &perm2);
  printf("arch_prctl get=%ld perm=0x%lx req=%ld perm_after=0x%lx\n", r1, perm, r2, perm2);
  fflush(stdout);
  if (!((xcr0 >> 18) & 1) || r2 != 0) { printf("AMX not usable by this process: MLAS's check (xcr0 tile bits + MlasInitAMX) fails, it keeps the VNNI kernels\n"); return 0; }
  static int8_t A[16 * 64], B[16 * 64]; static int32_t C[16 * 16];
  memset(A, 1, sizeof A); memset(B, 1, sizeof B);
  cfg_t cfg; memset(&cfg, 0, sizeof cfg); cfg.palette = 1;
  for (int t = 0; t < 3; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
  _tile_loadconfig(&cfg);
  _tile_loadd(1, A, 64); _tile_loadd(2, B, 64); _tile_zero(0);
  long n = 20000000; double t0 = now();
  for (long i = 0; i < n; i++) _tile_dpbssd(0, 1, 2);
  double t = now() - t0;
  _tile_stored(0, C, 64); _tile_release();
  printf("tdpbssd: C[0]=%d (expect %ld), %.1f GMAC/s on one core (16x16x64 MAC per instruction)\n", C[0], 64L * n, n * 16.0 * 16 * 64 / t / 1e9);
  return 0;
}
