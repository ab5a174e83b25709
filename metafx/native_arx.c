/* metafx native ARX runtime: the streaming computation of metafx.export.ARXStream in plain C.
 *
 * This file is the generic half of an exported model.c: metafx/native_export.py writes the model's
 * sizes (MFX_* macros) and numbers (static const arrays) above it, so model.c compiles alone:
 *
 *     cc -O3 -march=native -fPIC -shared model.c -o model.so -lm
 *
 * (metafx adds -fopenmp-simd -fno-math-errno -DMFX_VECMATH -lmvec where glibc >= 2.35 has vector exp, log,
 * log1p and tanh: the loops over a block's samples then run several samples per instruction. It also adds
 * -fno-trapping-math, without which GCC leaves every loop with a comparison in it (a clamp, a floor, a min)
 * scalar: banked libraries ran 1.09-1.35x slower without it, benchmarks/export_rtf.md.)
 *
 * C API (a host allocates one state per channel it processes; model.h, written beside model.c from
 * metafx/native_arx.h, declares it for C and C++ hosts):
 *
 *     void *mfx_create(void);                     zeroed state (initial_state), or NULL (out of memory)
 *     void  mfx_reset(void *state);               back to the zero state
 *     void  mfx_process(void *state, const float *x, float *y, long n);
 *                                                 n >= 0 samples at mfx_sample_rate(); x and y may be the same
 *                                                 buffer; any block size (blocks of CH samples inside); no
 *                                                 allocation, no locks, no system calls: real-time safe
 *     void  mfx_destroy(void *state);
 *     int   mfx_sample_rate(void), mfx_latency_samples(void), mfx_abi_version(void), mfx_format_version(void);
 *
 * What it computes, sample by sample (the export's block formulas are exact rewrites of these recursions):
 * peak followers p = max(|x|, r p); one-poles e = (1 - a) u + a e of |x| (envelopes), x (input and bank
 * low-passes) and p (smoothed peaks); the channels [1, x, pointwise MLP(x) (tabulated, or of x and its
 * low-passes), x sigmoid(MLP(log envelopes, start decays)) (float32), log envelopes / 4, the bank's curves
 * tanh(W [x, lps] + c) (float32), anti-aliased tanh units, cascade units]; the gain units x min(1, l / e)
 * over the smoothed peaks and the dynamics envelope (hold, attack one-pole, release follower); then
 * A(z) y = sum_m B_m(z) channel_m. Float32 where the export computes float32, float64 elsewhere, so the
 * output equals model.ts to float rounding.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(MFX_VECMATH)
/* glibc's vector math (libmvec): the declarations glibc's own headers make under -ffast-math, made here
 * without -ffast-math (which, in a shared library built by GCC < 13, switches the host process's FPU to
 * flush-to-zero at load time) */
#pragma omp declare simd notinbranch
extern double exp(double);
#pragma omp declare simd notinbranch
extern double log(double);
#pragma omp declare simd notinbranch
extern double log1p(double);
#pragma omp declare simd notinbranch
extern double tanh(double);
#pragma omp declare simd notinbranch
extern float expf(float);
#endif

#define MFX_ABI 1
#define CH 128                          /* samples per inner block */
#define SZ(n) ((n) > 0 ? (n) : 1)       /* C has no zero-length arrays */
#define NX (MFX_NF + MFX_NBLP)          /* one-poles driven by x */
#define NIN (1 + MFX_NBLP)              /* the bank's inputs: x and its low-passes */
#define NGIN (MFX_NE + MFX_NSTART)      /* the gate MLP's inputs */
#define HL (MFX_NB - 1)                 /* carried feature frames */
#define PIN (1 + MFX_NF)                /* the pointwise MLP's inputs */

typedef struct {
    double pole[SZ(MFX_NPOLE)];         /* one-poles: envelopes, input filters, bank low-passes, smoothed peaks */
    double peak[SZ(MFX_NPEAK)];         /* peak followers */
    double aa_last[SZ(MFX_NAA)];        /* anti-aliased units' last inputs */
    double cas_u;                       /* cascade: the first curve's last input */
    double cas_lp[SZ(MFX_NCASLP)];      /* its one-poles */
    double cas_last[SZ(MFX_NCAS)];      /* its units' last inputs */
    double dyn_u, dyn_e;                /* dynamics: attack one-pole, release follower */
    double dq_v[MFX_HOLD + 1];          /* its hold: a monotonic deque of (|x|, sample index), a ring */
    long long dq_i[MFX_HOLD + 1];
    int dq_head, dq_len;
    long long n_abs;                    /* samples so far (the hold's index) */
    double t;                           /* samples so far (the start decays), as the export counts them */
    double ypast[SZ(MFX_NA)];           /* last na outputs, oldest first */
    /* scratch of one inner block */
    double x[CH], ax[CH], u[CH], gsum[CH], tmp[CH], lc[CH];
    double P[SZ(MFX_NPOLE)][CH];
    double pk[SZ(MFX_NPEAK)][CH];
    double le[SZ(MFX_NE)][CH];
    float gin[SZ(NGIN)][CH];
    float gh[SZ(MFX_GH)][CH];
    float fz[CH];
    float binf[NIN][CH];
    double yb[MFX_NA + CH];
    double frames[SZ(MFX_NFR)][HL + CH]; /* first HL columns: the carried last frames */
} mfx_state;

#if MFX_TABLE
/* the pointwise MLP tabulated over [TLO, -TLO] (as ARXStream's table: float64 MLP, float32 values; one extra
 * column at the top); filled when the library is loaded */
static float TABLE[MFX_TSIZE + 2][SZ(MFX_NPOINT)];  /* grid-point-major: a sample's values in one cache line */

__attribute__((constructor)) static void mfx_fill_table(void) {
    const long steps = MFX_TSIZE + 1;
    const double start = MFX_TLO, end = -MFX_TLO, step = (end - start) / (double)(steps - 1);
    const long half = steps / 2;
    for (long i = 0; i < steps; i++) {
        double g = i < half ? start + step * (double)i : end - step * (double)(steps - 1 - i); /* torch.linspace */
        for (int p = 0; p < MFX_NPOINT; p++) {
            double acc = 0.0;
            for (int k = 0; k < MFX_PH; k++) acc += P2[p * MFX_PH + k] * tanh(g * P1[k] + P1B[k]);
            TABLE[i][p] = (float)(acc + P2B[p]);
        }
    }
    for (int p = 0; p < MFX_NPOINT; p++) TABLE[steps][p] = TABLE[steps - 1][p];
}
#endif

static inline float sigmoidf_(float z) { return 1.0f / (1.0f + expf(-z)); }

/* one row of a float32 affine map over a block: z[t] = bias + sum_i w[i] in[i][t] */
static void affine_f(float *restrict z, float bias, const float *w, const float (*in)[CH], int nin, int n) {
    for (int t = 0; t < n; t++) z[t] = bias;
    int i = 0;
    for (; i + 4 <= nin; i += 4) {  /* four inputs per pass over z (a quarter of its loads and stores) */
        const float w0 = w[i], w1 = w[i + 1], w2 = w[i + 2], w3 = w[i + 3];
        const float *i0 = in[i], *i1 = in[i + 1], *i2 = in[i + 2], *i3 = in[i + 3];
        for (int t = 0; t < n; t++) z[t] += w0 * i0[t] + w1 * i1[t] + w2 * i2[t] + w3 * i3[t];
    }
    for (; i < nin; i++) {
        const float wi = w[i];
        for (int t = 0; t < n; t++) z[t] += wi * in[i][t];
    }
}

/* anti-aliased tanh of z[0..n) after *last (metafx.wiener.adaa_tanh); updates *last */
static void adaa(mfx_state *s, const double *restrict z, double *restrict out, double *last, int n) {
    double *restrict lc = s->lc;
    for (int t = 0; t < n; t++) {
        double a = fabs(z[t]);
        lc[t] = a + log1p(exp(-2.0 * a));
    }
    double zp = *last, ap = fabs(zp);
    double lcp = ap + log1p(exp(-2.0 * ap));
    int small = 0;
    for (int t = 0; t < n; t++) {
        double prev = t ? z[t - 1] : zp, lprev = t ? lc[t - 1] : lcp;
        double dz = z[t] - prev;
        small |= fabs(dz) < MFX_ADAA_EPS;
        out[t] = (lc[t] - lprev) / (fabs(dz) < MFX_ADAA_EPS ? 1.0 : dz);
    }
    if (small)  /* steps below eps: the midpoint's tanh (rare: a vectorized loop would take tanh of every step) */
        for (int t = 0; t < n; t++) {
            double prev = t ? z[t - 1] : zp;
            if (fabs(z[t] - prev) < MFX_ADAA_EPS) out[t] = tanh(0.5 * (z[t] + prev));
        }
    *last = z[n - 1];
}

static void block(mfx_state *s, const float *in, float *out, int n) {
    double *restrict x = s->x, *restrict ax = s->ax;
    for (int t = 0; t < n; t++) { x[t] = (double)in[t]; ax[t] = fabs(x[t]); }
    /* peak followers (max(|x|, floor) first: the export floors them) */
    for (int r = 0; r < MFX_NPEAK; r++) {
        double p = s->peak[r];
        const double rr = PEAK_R[r];
        for (int t = 0; t < n; t++) {
            double v = ax[t] > MFX_GAIN_FLOOR ? ax[t] : MFX_GAIN_FLOOR, q = rr * p;
            p = v > q ? v : q;
            s->pk[r][t] = p;
        }
        s->peak[r] = p;
    }
    /* one-poles, the rows interleaved sample by sample (independent recursions: no row waits on its own latency) */
#if MFX_NPOLE
    {
        const double *in[MFX_NPOLE];
        double e[MFX_NPOLE], pb[MFX_NPOLE];
        for (int p = 0; p < MFX_NPOLE; p++) {
            in[p] = p < MFX_NE ? ax : p < MFX_NE + NX ? x : s->pk[MFX_NPEAK ? (p - MFX_NE - NX) / SZ(MFX_NATTACK) : 0];
            e[p] = s->pole[p];
            pb[p] = 1.0 - POLE_A[p];
        }
        for (int t = 0; t < n; t++)
            for (int p = 0; p < MFX_NPOLE; p++) {
                e[p] = pb[p] * in[p][t] + POLE_A[p] * e[p];
                s->P[p][t] = e[p];
            }
        for (int p = 0; p < MFX_NPOLE; p++) s->pole[p] = e[p];
    }
#endif
    int m = 0;  /* frame row */
    double (*F)[HL + CH] = s->frames;
    for (int t = 0; t < n; t++) { F[0][HL + t] = 1.0; F[1][HL + t] = x[t]; }
    m = 2;
#if MFX_NPOINT
#if MFX_TABLE
    for (int t = 0; t < n; t++) {
        double xc = x[t] < MFX_TLO ? MFX_TLO : x[t] > -MFX_TLO ? -MFX_TLO : x[t];
        double pos = (xc - MFX_TLO) * MFX_TINV;
        long il = (long)pos;
        if (il < 0) il = 0;
        if (il > MFX_TSIZE - 1) il = MFX_TSIZE - 1;
        float f = (float)(pos - (double)il);
        for (int p = 0; p < MFX_NPOINT; p++) {
            float v0 = TABLE[il][p], v1 = TABLE[il + 1][p], d = v1 - v0;
            F[m + p][HL + t] = (double)(f < 0.5f ? v0 + f * d : v1 - d * (1.0f - f));  /* torch.lerp */
        }
    }
#else
    {
        double h[SZ(MFX_PH)][CH];
        for (int k = 0; k < MFX_PH; k++) {
            for (int t = 0; t < n; t++) s->tmp[t] = P1B[k] + P1[k * PIN] * x[t];
            for (int f = 0; f < MFX_NF; f++) {
                const double w = P1[k * PIN + 1 + f];
                const double *lp = s->P[MFX_NE + f];
                for (int t = 0; t < n; t++) s->tmp[t] += w * lp[t];
            }
            for (int t = 0; t < n; t++) h[k][t] = tanh(s->tmp[t]);
        }
        for (int p = 0; p < MFX_NPOINT; p++) {
            double *o = F[m + p] + HL;
            for (int t = 0; t < n; t++) o[t] = P2B[p];
            for (int k = 0; k < MFX_PH; k++) {
                const double w = P2[p * MFX_PH + k];
                for (int t = 0; t < n; t++) o[t] += w * h[k][t];
            }
        }
    }
#endif
    m += MFX_NPOINT;
#endif
#if MFX_NE
    for (int e = 0; e < MFX_NE; e++)
        for (int t = 0; t < n; t++) {
            double v = s->P[e][t] > 0.0 ? s->P[e][t] : 0.0;
            s->le[e][t] = log(v + MFX_ENV_FLOOR) * MFX_INV_LN10 + 2.0;
        }
#if MFX_NGATE
    for (int e = 0; e < MFX_NE; e++)
        for (int t = 0; t < n; t++) s->gin[e][t] = (float)s->le[e][t];
    for (int k = 0; k < MFX_NSTART; k++)
        for (int t = 0; t < n; t++) s->gin[MFX_NE + k][t] = (float)exp(-(s->t + (double)t) / START_TAU[k]);
    for (int k = 0; k < MFX_GH; k++) {
        float *z = s->fz;
        affine_f(z, G1B[k], G1 + k * NGIN, (const float (*)[CH])s->gin, NGIN, n);
        for (int t = 0; t < n; t++) s->gh[k][t] = sigmoidf_(z[t]);
    }
    for (int j = 0; j < MFX_NGATE; j++) {
        float *z = s->fz;
        affine_f(z, G2B[j], G2 + j * MFX_GH, (const float (*)[CH])s->gh, MFX_GH, n);
        double *o = F[m + j] + HL;
        for (int t = 0; t < n; t++) o[t] = x[t] * (double)sigmoidf_(z[t]);
    }
    m += MFX_NGATE;
#endif
    for (int e = 0; e < MFX_NE; e++)
        for (int t = 0; t < n; t++) F[m + e][HL + t] = 0.25 * s->le[e][t];
    m += MFX_NE;
#endif
    /* the bank: inputs [x, its low-passes] */
    const double *bin[NIN];
    bin[0] = x;
    for (int i = 0; i < MFX_NBLP; i++) bin[1 + i] = s->P[MFX_NE + MFX_NF + i];
#if MFX_NR
    for (int i = 0; i < NIN; i++)
        for (int t = 0; t < n; t++) s->binf[i][t] = (float)bin[i][t];
    for (int r = 0; r < MFX_NR; r++) {
        float *z = s->fz;
        affine_f(z, BANK_C[r], BANK_W + r * NIN, (const float (*)[CH])s->binf, NIN, n);
        double *o = F[m + r] + HL;
        for (int t = 0; t < n; t++) o[t] = (double)(sigmoidf_(z[t]) * 2.0f - 1.0f);
    }
    m += MFX_NR;
#endif
#if MFX_NAA
    for (int k = 0; k < MFX_NAA; k++) {
        for (int t = 0; t < n; t++) s->tmp[t] = AA_C[k];
        for (int i = 0; i < NIN; i++) {
            const double w = AA_W[k * NIN + i];
            for (int t = 0; t < n; t++) s->tmp[t] += w * bin[i][t];
        }
        adaa(s, s->tmp, F[m + k] + HL, &s->aa_last[k], n);
    }
    m += MFX_NAA;
#endif
#if MFX_NCAS
    {
        double v[CH], w[CH];
        for (int t = 0; t < n; t++) s->tmp[t] = MFX_CAS_C;
        for (int i = 0; i < NIN; i++)
            for (int t = 0; t < n; t++) s->tmp[t] += CAS_W[i] * bin[i][t];
        adaa(s, s->tmp, v, &s->cas_u, n);
        for (int t = 0; t < n; t++) { v[t] += MFX_CAS_SHIFT; w[t] = CAS_BETA[0] * v[t]; }
        double e[SZ(MFX_NCASLP)], cb[SZ(MFX_NCASLP)];
        for (int j = 0; j < MFX_NCASLP; j++) { e[j] = s->cas_lp[j]; cb[j] = 1.0 - CAS_A[j]; }
        for (int t = 0; t < n; t++) {  /* the one-poles interleaved, as above */
            double acc = w[t];
            for (int j = 0; j < MFX_NCASLP; j++) {
                e[j] = cb[j] * v[t] + CAS_A[j] * e[j];
                acc += CAS_BETA[1 + j] * e[j];
            }
            w[t] = acc;
        }
        for (int j = 0; j < MFX_NCASLP; j++) s->cas_lp[j] = e[j];
        for (int k = 0; k < MFX_NCAS; k++) {
            for (int t = 0; t < n; t++) s->tmp[t] = CAS_B[k] + CAS_G[k] * w[t];
            adaa(s, s->tmp, F[m + k] + HL, &s->cas_last[k], n);
        }
    }
    m += MFX_NCAS;
#endif
    (void)m;
    /* the head's FIR part: u[t] = sum_m sum_j b[m][j] frame_m[t - j] */
    double *restrict u = s->u;
    for (int t = 0; t < n; t++) u[t] = 0.0;
    int r = 0;
    for (; r + 4 <= MFX_NFR; r += 4)  /* four channels per pass over u (a quarter of its loads and stores) */
        for (int j = 0; j < MFX_NB; j++) {
            const double b0 = FIR_B[r * MFX_NB + j], b1 = FIR_B[(r + 1) * MFX_NB + j];
            const double b2 = FIR_B[(r + 2) * MFX_NB + j], b3 = FIR_B[(r + 3) * MFX_NB + j];
            const double *f0 = F[r] + HL - j, *f1 = F[r + 1] + HL - j, *f2 = F[r + 2] + HL - j, *f3 = F[r + 3] + HL - j;
            for (int t = 0; t < n; t++) u[t] += b0 * f0[t] + b1 * f1[t] + b2 * f2[t] + b3 * f3[t];
        }
    for (; r < MFX_NFR; r++)
        for (int j = 0; j < MFX_NB; j++) {
            const double bj = FIR_B[r * MFX_NB + j];
            const double *f = F[r] + HL - j;
            for (int t = 0; t < n; t++) u[t] += bj * f[t];
        }
#if MFX_NG
    /* the gain units at lag 0: x times their weighted gains min(1, level / envelope) */
    double *restrict gs = s->gsum;
    for (int t = 0; t < n; t++) gs[t] = 0.0;
#if MFX_NATT
    for (int i = 0; i < MFX_NATT; i++) {
        const double *env = s->P[MFX_NPOLE - MFX_NATT + i];
        for (int l = 0; l < MFX_NLEV; l++) {
            const double lev = LEV[l], w = GAIN_W[i * MFX_NLEV + l];
            for (int t = 0; t < n; t++) {
                double e = env[t] > MFX_GAIN_FLOOR ? env[t] : MFX_GAIN_FLOOR, g = lev / e;
                gs[t] += w * (g < 1.0 ? g : 1.0);
            }
        }
    }
#endif
#if MFX_NDYN
    {
        const int cap = MFX_HOLD + 1;
        double *e = s->tmp;
        for (int t = 0; t < n; t++) {  /* the hold: max |x| over the last HOLD + 1 samples */
            long long idx = s->n_abs++;
            double v = ax[t];
            /* expire first, then push: the deque never holds more than the window's HOLD + 1 samples */
            while (s->dq_len && s->dq_i[s->dq_head] < idx - MFX_HOLD) { s->dq_head = (s->dq_head + 1) % cap; s->dq_len--; }
            while (s->dq_len && s->dq_v[(s->dq_head + s->dq_len - 1) % cap] <= v) s->dq_len--;
            s->dq_v[(s->dq_head + s->dq_len) % cap] = v;
            s->dq_i[(s->dq_head + s->dq_len) % cap] = idx;
            s->dq_len++;
            double h = s->dq_v[s->dq_head];
            s->dyn_u = (1.0 - MFX_DYN_ATT) * h + MFX_DYN_ATT * s->dyn_u;
            double c = (1.0 - MFX_DYN_REL) * s->dyn_u + MFX_DYN_REL * s->dyn_e;
            s->dyn_e = s->dyn_u > c ? s->dyn_u : c;
            e[t] = s->dyn_e > MFX_GAIN_FLOOR ? s->dyn_e : MFX_GAIN_FLOOR;
        }
        for (int k = 0; k < MFX_NDYN; k++) {
            const double lev = DYN_LEV[k], w = GAIN_W[MFX_NGRID + k];
            for (int t = 0; t < n; t++) { double g = lev / e[t]; gs[t] += w * (g < 1.0 ? g : 1.0); }
        }
    }
#endif
    for (int t = 0; t < n; t++) u[t] += x[t] * gs[t];
#endif
    /* the recursive part: y[t] = u[t] - sum_k a_k y[t - k] */
    double *restrict yb = s->yb;
    for (int k = 0; k < MFX_NA; k++) yb[k] = s->ypast[k];
    for (int t = 0; t < n; t++) {
        double y = u[t];
        for (int k = 1; k <= MFX_NA; k++) y -= AR[k - 1] * yb[MFX_NA + t - k];
        yb[MFX_NA + t] = y;
        out[t] = (float)y;
    }
    for (int k = 0; k < MFX_NA; k++) s->ypast[k] = yb[n + k];
    /* carry the last HL frames */
    for (int r = 0; r < MFX_NFR; r++) memmove(F[r], F[r] + n, HL * sizeof(double));
    s->t += (double)n;
}

int mfx_abi_version(void) { return MFX_ABI; }
int mfx_format_version(void) { return MFX_FORMAT; }
int mfx_sample_rate(void) { return MFX_SR; }
int mfx_latency_samples(void) { return MFX_LAT; }

void mfx_reset(void *state) {
    mfx_state *s = (mfx_state *)state;
    memset(s, 0, sizeof(*s));
    for (int k = 0; k < MFX_NAA; k++) s->aa_last[k] = AA_C[k];      /* an anti-aliased unit's input before the */
#if MFX_NCAS
    s->cas_u = MFX_CAS_C;                                              /* first sample is its offset (x is 0) */
    for (int k = 0; k < MFX_NCAS; k++) s->cas_last[k] = CAS_B[k];
#endif
}

void *mfx_create(void) {
    void *s = malloc(sizeof(mfx_state));
    if (s) mfx_reset(s);
    return s;
}

void mfx_destroy(void *state) { free(state); }

void mfx_process(void *state, const float *x, float *y, long n) {
    mfx_state *s = (mfx_state *)state;
    while (n > 0) {
        int c = n < CH ? (int)n : CH;
        block(s, x, y, c);
        x += c;
        y += c;
        n -= c;
    }
}
