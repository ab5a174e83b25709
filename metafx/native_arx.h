/* model.h: the C API of a metafx native export (model.c), for the host that compiles model.c in.
 *
 * A plugin or any host (C or C++) includes this header and links model.c compiled as C:
 *
 *     cc -O2 -fPIC -c model.c -o model.o          # C, not C++ (it uses C99's restrict)
 *     c++ -O2 host.cpp model.o -lm -o host         # or add model.o to the plugin's build
 *
 * For speed, compile model.c with the flags metafx's own build uses (results.json's export.native.command):
 * -ftree-vectorize -fno-math-errno -fno-trapping-math (GCC vectorizes loops with comparisons only then:
 * banked models 1.09-1.35x faster) and, on the machine it runs on, -march=native.
 *
 * One state per channel processed; every function but mfx_create and mfx_destroy is real-time safe
 * (no allocation, no locks, no system calls). The model runs at mfx_sample_rate() only: a host at
 * another rate resamples around it. Report mfx_latency_samples() to the host as the plugin's latency
 * (the device's latency found at capture, kept so the output lines up with the recorded wet).
 */
#ifndef METAFX_MODEL_H
#define METAFX_MODEL_H

#ifdef __cplusplus
extern "C" {
#endif

/* A new zeroed state (what the model holds before the first sample), or NULL (out of memory). */
void *mfx_create(void);
/* The state back to zero (a new take, a transport jump). */
void mfx_reset(void *state);
/* n >= 0 samples at mfx_sample_rate(): y[i] from x[0..i] and the state; x and y may be the same buffer;
 * any block size, the state carried from block to block. */
void mfx_process(void *state, const float *x, float *y, long n);
/* Free a state of mfx_create. */
void mfx_destroy(void *state);
/* The model's rate in Hz, the latency it carries in samples, and the versions of the runtime's ABI (this
 * header's functions) and of the export format. */
int mfx_sample_rate(void);
int mfx_latency_samples(void);
int mfx_abi_version(void);
int mfx_format_version(void);

#ifdef __cplusplus
}
#endif

#endif /* METAFX_MODEL_H */
