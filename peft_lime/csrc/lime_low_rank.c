/* LiME over a low-rank adapter (plain LoRA): the modulated update and its backward, for float32 CPU calls.
 *
 * y = out + s * (a @ B.T) * (mix @ P), per token: a (N, r), mix (N, E), BT = B.T (r, d), P = experts + offset
 * (E, d). Written with torch ops that is either a GEMM with an inner size of r E (low_rank_mix.py: 8x the
 * arithmetic of LoRA's up-projection) or three (N, d) element-wise passes over memory. Here each output row is
 * made in registers from r + E rows of BT and P (a quarter of the GEMM's arithmetic for r = E), with one read of
 * out and one write of y (y may be out itself).
 *
 * lime_low_rank_backward: the gradients of a, mix, BT and P from grad_y, recomputing both (N, d) factors per
 * tile instead of keeping them.
 *
 * Tiles of TILE_TOKENS tokens x LANES columns: for each of the r + E weight rows one vector load is shared by the
 * tokens of the tile. Vectors are GCC / clang vector extensions; the library is built for the host CPU where the
 * compiler allows it (peft_lime/native_build.py), else for the baseline ISA (slower, same results up to rounding).
 * Tokens are split over `threads` OpenMP threads where the library is built with OpenMP (see run_split).
 */
#include <stdlib.h>
#include <string.h>

/* LANES is the target's own vector width: a vector wider than the registers is split by the compiler into pieces that
 * it keeps on the stack (on an AVX2 CPU, 16-float vectors made these loops 3-5x slower than 8-float ones; ad-hoc
 * microbenchmark of both entries, one thread, d = 192 .. 1536). TILE_TOKENS: the most tokens whose partial sums
 * still fit the 16 vector registers of AVX2 / SSE beside the weight row (6 beat 2, 3, 4 and 8 there); AVX-512 keeps
 * the tile of 4 these loops were first measured with. */
#ifndef LANES /* -DLANES=.. -DTILE_TOKENS=.. override both (benchmarks/low_rank_kernel.py compares builds) */
#if defined(__AVX512F__)
#define LANES 16
#define TILE_TOKENS 4
#elif defined(__AVX__)
#define LANES 8
#define TILE_TOKENS 6
#else
#define LANES 4
#define TILE_TOKENS 6
#endif
#endif
#define MAX_THREADS 64
#define MAX_FACTORS 64 /* r and E: per-token partial sums live on the stack */
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));

#define VLOAD(dst, p) memcpy(&(dst), (p), sizeof(vec))
#define VSTORE(p, v) memcpy((p), &(v), sizeof(vec))

typedef struct {
    const float *a, *mix, *BT, *P, *out, *grad;
    float *y, *grad_a, *grad_mix, *grad_BT, *grad_P;
    long r, E, d, t0, t1;
    float s;
} job_t;

/* One token's row of y, scalar: for the columns past the last full vector and the tokens past the last tile. */
static void forward_scalar(const job_t *j, long t, long c0) {
    const float *at = j->a + t * j->r, *mt = j->mix + t * j->E;
    for (long c = c0; c < j->d; ++c) {
        float row = 0.0f, mod = 0.0f;
        for (long k = 0; k < j->r; ++k) row += at[k] * j->BT[k * j->d + c];
        for (long e = 0; e < j->E; ++e) mod += mt[e] * j->P[e * j->d + c];
        j->y[t * j->d + c] = j->out[t * j->d + c] + j->s * row * mod;
    }
}

/* Columns [c, c + LANES) of both factors for the tile's tokens t .. t + TILE_TOKENS - 1: row = a @ BT, mod = mix @ P.
 * One vector load of each weight row serves every token of the tile. */
static inline void tile_factors(const job_t *j, long t, long c, vec *row, vec *mod) {
    const long r = j->r, E = j->E, d = j->d;
    vec w;
    for (int u = 0; u < TILE_TOKENS; ++u) row[u] = mod[u] = (vec){0};
    for (long k = 0; k < r; ++k) {
        VLOAD(w, j->BT + k * d + c);
        for (int u = 0; u < TILE_TOKENS; ++u) row[u] += j->a[(t + u) * r + k] * w;
    }
    for (long e = 0; e < E; ++e) {
        VLOAD(w, j->P + e * d + c);
        for (int u = 0; u < TILE_TOKENS; ++u) mod[u] += j->mix[(t + u) * E + e] * w;
    }
}

static void forward_rows(const job_t *j) {
    const long d = j->d, full = d / LANES * LANES;
    long t = j->t0;
    for (; t + TILE_TOKENS <= j->t1; t += TILE_TOKENS) {
        for (long c = 0; c < full; c += LANES) {
            vec row[TILE_TOKENS], mod[TILE_TOKENS], o;
            tile_factors(j, t, c, row, mod);
            for (int u = 0; u < TILE_TOKENS; ++u) {
                VLOAD(o, j->out + (t + u) * d + c);
                o += j->s * row[u] * mod[u];
                VSTORE(j->y + (t + u) * d + c, o);
            }
        }
        for (int u = 0; u < TILE_TOKENS; ++u) forward_scalar(j, t + u, full);
    }
    for (; t < j->t1; ++t) forward_scalar(j, t, 0);
}

/* Backward of one token range into this job's own grad_BT / grad_P (zeroed by the caller); grad_a and grad_mix
 * rows belong to the token. With row = a BT, mod = mix P, g = grad_y (per token):
 *   grad_a = s (g * mod) @ BT.T,  grad_mix = s (g * row) @ P.T,  grad_BT += s a (x) (g * mod),
 *   grad_P += s mix (x) (g * row). */
static void backward_scalar(const job_t *j, long t, long c0, float *ga, float *gm) {
    const long r = j->r, E = j->E, d = j->d;
    const float *at = j->a + t * r, *mt = j->mix + t * E, *gt = j->grad + t * d;
    for (long c = c0; c < d; ++c) {
        float row = 0.0f, mod = 0.0f;
        for (long k = 0; k < r; ++k) row += at[k] * j->BT[k * d + c];
        for (long e = 0; e < E; ++e) mod += mt[e] * j->P[e * d + c];
        const float gd = j->s * gt[c] * mod, gr = j->s * gt[c] * row;
        for (long k = 0; k < r; ++k) {
            ga[k] += gd * j->BT[k * d + c];
            j->grad_BT[k * d + c] += at[k] * gd;
        }
        for (long e = 0; e < E; ++e) {
            gm[e] += gr * j->P[e * d + c];
            j->grad_P[e * d + c] += mt[e] * gr;
        }
    }
}

static float hsum(const vec *v) {
    float total = 0.0f;
    for (int i = 0; i < LANES; ++i) total += (*v)[i];
    return total;
}

static void backward_token(const job_t *j, long t) {
    const long r = j->r, E = j->E;
    float ga[MAX_FACTORS] = {0}, gm[MAX_FACTORS] = {0}; /* r, E <= 64 (checked by the entry points) */
    backward_scalar(j, t, 0, ga, gm);
    for (long k = 0; k < r; ++k) j->grad_a[t * r + k] = ga[k];
    for (long e = 0; e < E; ++e) j->grad_mix[t * E + e] = gm[e];
}

static void backward_rows(const job_t *j) {
    const long r = j->r, E = j->E, d = j->d, full = d / LANES * LANES;
    const float s = j->s;
    long t = j->t0;
    for (; t + TILE_TOKENS <= j->t1; t += TILE_TOKENS) {
        /* Per token and factor row, a vector of partial sums over the columns: reduced once at the end. */
        vec acc_a[TILE_TOKENS][MAX_FACTORS], acc_m[TILE_TOKENS][MAX_FACTORS];
        for (int u = 0; u < TILE_TOKENS; ++u) {
            for (long k = 0; k < r; ++k) acc_a[u][k] = (vec){0};
            for (long e = 0; e < E; ++e) acc_m[u][e] = (vec){0};
        }
        for (long c = 0; c < full; c += LANES) {
            vec row[TILE_TOKENS], mod[TILE_TOKENS], w, g;
            tile_factors(j, t, c, row, mod);
            for (int u = 0; u < TILE_TOKENS; ++u) {
                VLOAD(g, j->grad + (t + u) * d + c);
                g *= s;
                mod[u] *= g; /* now s g * mod: the gradient reaching the adapter's output */
                row[u] *= g; /* now s g * row: the gradient reaching the modulation */
            }
            for (long k = 0; k < r; ++k) {
                VLOAD(w, j->BT + k * d + c);
                vec acc;
                VLOAD(acc, j->grad_BT + k * d + c);
                for (int u = 0; u < TILE_TOKENS; ++u) {
                    acc_a[u][k] += mod[u] * w;
                    acc += j->a[(t + u) * r + k] * mod[u];
                }
                VSTORE(j->grad_BT + k * d + c, acc);
            }
            for (long e = 0; e < E; ++e) {
                VLOAD(w, j->P + e * d + c);
                vec acc;
                VLOAD(acc, j->grad_P + e * d + c);
                for (int u = 0; u < TILE_TOKENS; ++u) {
                    acc_m[u][e] += row[u] * w;
                    acc += j->mix[(t + u) * E + e] * row[u];
                }
                VSTORE(j->grad_P + e * d + c, acc);
            }
        }
        for (int u = 0; u < TILE_TOKENS; ++u) {
            float ga[MAX_FACTORS] = {0}, gm[MAX_FACTORS] = {0};
            backward_scalar(j, t + u, full, ga, gm);
            for (long k = 0; k < r; ++k) j->grad_a[(t + u) * r + k] = ga[k] + hsum(&acc_a[u][k]);
            for (long e = 0; e < E; ++e) j->grad_mix[(t + u) * E + e] = gm[e] + hsum(&acc_m[u][e]);
        }
    }
    for (; t < j->t1; ++t) backward_token(j, t);
}

/* Runs `work` over [0, n) split into `threads` ranges of whole tiles. With OpenMP, in the process's OpenMP thread
 * pool: loaded into a torch process, the library binds to torch's own libgomp (same soname), so the kernel runs on
 * torch's intra-op threads, which are awake (spinning) right after the torch ops around it. Threads of its own would
 * compete with those for the cores (measured slower than one thread on 2 cores). Without OpenMP: the calling thread
 * does it all. */
static void run_split(job_t *jobs, int threads, long n, void (*work)(const job_t *)) {
    const long per = ((n + threads - 1) / threads + TILE_TOKENS - 1) / TILE_TOKENS * TILE_TOKENS;
    for (int i = 0; i < threads; ++i) {
        jobs[i].t0 = i * per < n ? i * per : n;
        jobs[i].t1 = jobs[i].t0 + per < n ? jobs[i].t0 + per : n;
    }
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static, 1)
#endif
    for (int i = 0; i < threads; ++i) work(&jobs[i]);
}

static int clamp_threads(int threads, long n) {
#ifndef _OPENMP
    threads = 1;
#endif
    long most = (n + TILE_TOKENS - 1) / TILE_TOKENS;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > most) threads = (int)most;
    return threads < 1 ? 1 : threads;
}

/* y = out + s * (a @ BT) * (mix @ P); y may be out. Returns 0, or 2 when r or E exceeds 64. */
int lime_low_rank_modulate(const float *a, const float *mix, const float *BT, const float *P, const float *out,
                           float *y, long n, long r, long E, long d, float s, int threads) {
    if (r > MAX_FACTORS || E > MAX_FACTORS) return 2;
    job_t jobs[MAX_THREADS];
    threads = clamp_threads(threads, n);
    for (int i = 0; i < threads; ++i) jobs[i] = (job_t){.a = a, .mix = mix, .BT = BT, .P = P, .out = out, .y = y,
                                                         .r = r, .E = E, .d = d, .s = s};
    run_split(jobs, threads, n, forward_rows);
    return 0;
}

/* The gradients of a (n, r), mix (n, E), BT (r, d) and P (E, d) for grad_y `grad` (n, d); grad_BT and grad_P are
 * written (not accumulated). Returns 0, 2 when r or E exceeds 64, 3 when scratch memory cannot be had. */
int lime_low_rank_backward(const float *a, const float *mix, const float *BT, const float *P, const float *grad,
                           float *grad_a, float *grad_mix, float *grad_BT, float *grad_P, long n, long r, long E,
                           long d, float s, int threads) {
    if (r > MAX_FACTORS || E > MAX_FACTORS) return 2;
    job_t jobs[MAX_THREADS];
    threads = clamp_threads(threads, n);
    const long per_thread = (r + E) * d;
    /* Thread 0 accumulates into the outputs themselves; the others into scratch, summed in afterwards. */
    float *scratch = threads > 1 ? calloc((size_t)(threads - 1) * per_thread, sizeof(float)) : NULL;
    if (threads > 1 && !scratch) return 3;
    memset(grad_BT, 0, sizeof(float) * r * d);
    memset(grad_P, 0, sizeof(float) * E * d);
    for (int i = 0; i < threads; ++i) {
        float *own_BT = i == 0 ? grad_BT : scratch + (i - 1) * per_thread;
        float *own_P = i == 0 ? grad_P : own_BT + r * d;
        jobs[i] = (job_t){.a = a, .mix = mix, .BT = BT, .P = P, .grad = grad, .grad_a = grad_a, .grad_mix = grad_mix,
                          .grad_BT = own_BT, .grad_P = own_P, .r = r, .E = E, .d = d, .s = s};
    }
    run_split(jobs, threads, n, backward_rows);
    for (int i = 1; i < threads; ++i) {
        const float *part = scratch + (i - 1) * per_thread;
        for (long c = 0; c < r * d; ++c) grad_BT[c] += part[c];
        for (long c = 0; c < E * d; ++c) grad_P[c] += part[r * d + c];
    }
    free(scratch);
    return 0;
}
