/* LiME's routing and modulation of one layer call, for small no-grad float32 CPU calls (decoding).
 *
 * The same math as peft_lime/routing.py (token-norm logits, softmax over experts, Auto Top-K / top-k selection,
 * soft or hard) and peft_lime/modulation.py (y = out + delta * (offset + mix @ W)), token by token, in one call:
 * in eager decoding those are ~40 tiny tensor ops per layer whose dispatch, not their arithmetic, is LiME's cost
 * over plain LoRA. Built and loaded by peft_lime/native_route.py; the Python side checks every precondition
 * (contiguous float32 CPU tensors, E <= LIME_MAX_EXPERTS, the settings this file covers).
 *
 * lime_route_weights computes the mixing weights only, for large calls whose modulation is one GEMM
 * (peft_lime/low_rank_mix.py).
 *
 * Both return 0 on success and 1 when hard top-k selection meets a tie at its cut: which of the tied experts
 * torch.topk keeps is not specified, so the caller then runs the eager path instead (nothing has been written
 * to y that the caller keeps).
 */
#include <math.h>

#define LIME_MAX_EXPERTS 64

static void softmax(const float *logits, float *probs, long n) {
    float top = logits[0];
    for (long e = 1; e < n; ++e) top = logits[e] > top ? logits[e] : top;
    float total = 0.0f;
    for (long e = 0; e < n; ++e) {
        probs[e] = expf(logits[e] - top);
        total += probs[e];
    }
    for (long e = 0; e < n; ++e) probs[e] /= total;
}

/* The k-th largest value of p (k >= 1), counting repeated values, as torch.topk(p, k).values[-1]. */
static float kth_largest(const float *p, long n, long k) {
    float sorted[LIME_MAX_EXPERTS] = {0};
    for (long e = 0; e < n; ++e) {
        long i = e;
        while (i > 0 && sorted[i - 1] < p[e]) {
            sorted[i] = sorted[i - 1];
            --i;
        }
        sorted[i] = p[e];
    }
    return sorted[k - 1];
}

/* Mixing weights of one token (routing.select_experts with the logits given); 1 on an ambiguous hard tie. */
static int select_weights(const float *logits, const float *p, long n, long k, int auto_topk, float threshold,
                          int hard, float inv_t, float *w) {
    float x[LIME_MAX_EXPERTS];
    float top = p[0];
    for (long e = 1; e < n; ++e) top = p[e] > top ? p[e] : top;
    if (auto_topk && k == n) {
        for (long e = 0; e < n; ++e) x[e] = p[e] - threshold * top;
    } else {
        float kth = kth_largest(p, n, k);
        float cut = kth;
        if (auto_topk) cut = top * threshold > kth ? top * threshold : kth;
        long ties_in = 0, above = 0;
        for (long e = 0; e < n; ++e) {
            x[e] = p[e] - cut;
            above += p[e] > kth;
            ties_in += p[e] == kth;
        }
        /* More experts than k reach the k-th value and the cut admits them: torch.topk's choice decides. */
        if (hard && k < n && above + ties_in > k && kth >= cut) return 1;
    }
    if (hard) {
        float total = 0.0f;
        for (long e = 0; e < n; ++e) {
            w[e] = x[e] >= 0.0f ? p[e] : 0.0f;
            total += w[e];
        }
        for (long e = 0; e < n; ++e) w[e] /= total;
        return 0;
    }
    /* logits + log sigmoid(x / t), written as torch's softplus(x, beta=-1/t) / t with its threshold of 20. */
    float gated[LIME_MAX_EXPERTS];
    for (long e = 0; e < n; ++e) {
        float z = -x[e] * inv_t;
        float softplus = z > 20.0f ? x[e] : log1pf(expf(z)) / (-inv_t);
        gated[e] = logits[e] + inv_t * softplus;
    }
    softmax(gated, w, n);
    return 0;
}

/* Routing weights of one token from its routed slices h[0..E) and d[0..E); 1 on an ambiguous hard tie. */
static int route_token(const float *hn, const float *dn, long E, float c_h, float c_d, float floor2, float eps, long k,
                       int auto_topk, float threshold, int hard, float inv_t, float *w) {
    float logits[LIME_MAX_EXPERTS], probs[LIME_MAX_EXPERTS];
    /* Token-norm logits: c_h h / sqrt(m_h + eps) + c_d d / sqrt(m_d + floor^2 (m_h + eps)), m = mean square. */
    float s_h = 0.0f, s_d = 0.0f;
    for (long e = 0; e < E; ++e) {
        s_h += hn[e] * hn[e];
        s_d += dn[e] * dn[e];
    }
    const float m_h = s_h / (float)E + eps;
    const float inv_h = c_h / sqrtf(m_h);
    const float inv_d = c_d / sqrtf(s_d / (float)E + floor2 * m_h);
    for (long e = 0; e < E; ++e) logits[e] = inv_h * hn[e] + inv_d * dn[e];
    softmax(logits, probs, E);
    return select_weights(logits, probs, E, k, auto_topk, threshold, hard, inv_t, w);
}

/* Routing weights (n_tokens, E) only, for calls whose modulation runs elsewhere (the single-GEMM path of large
 * calls): h rows h_stride apart (the routed slice is each row's first E values), d rows d_stride apart. Tokens are
 * independent: with OpenMP, `threads` threads share them. */
int lime_route_weights(const float *h, long h_stride, const float *d, long d_stride, long n_tokens, long n_experts,
                       float c_h, float c_d, float floor2, float eps, long k, int auto_topk, float threshold, int hard,
                       float inv_t, float *weights_out, int threads) {
    int status = 0;
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : status) if (threads > 1)
#endif
    for (long n = 0; n < n_tokens; ++n)
        status |= route_token(h + n * h_stride, d + n * d_stride, n_experts, c_h, c_d, floor2, eps, k, auto_topk,
                              threshold, hard, inv_t, weights_out + n * n_experts);
    return status;
}

/* delta_scale: the adapter's output is delta_scale * delta (LoRA's scaling, applied here instead of by a separate
 * (1, d) multiply per layer and token); each value is scaled as torch's delta * scaling would round it. */
int lime_route_modulate(const float *h, const float *delta, float delta_scale, const float *out, float *y,
                        const float *experts, const float *shared, const float *gate, long n_tokens, long width,
                        long n_experts, float c_h, float c_d, float floor2, float eps, long k, int auto_topk,
                        float threshold, int hard, float inv_t, float *weights_out) {
    const long E = n_experts;
    float w[LIME_MAX_EXPERTS], routed[LIME_MAX_EXPERTS];
    const float g = shared ? gate[0] : 0.0f;
    for (long n = 0; n < n_tokens; ++n) {
        const float *hn = h + n * width, *dn = delta + n * width, *on = out + n * width;
        float *yn = y + n * width;
        for (long e = 0; e < E; ++e) routed[e] = dn[e] * delta_scale;
        if (route_token(hn, routed, E, c_h, c_d, floor2, eps, k, auto_topk, threshold, hard, inv_t, w)) return 1;
        if (weights_out)
            for (long e = 0; e < E; ++e) weights_out[n * E + e] = w[e];
        /* y = out + delta * (1 + g p_s + w @ W), one pass per term so every loop vectorises over the width. */
        if (shared)
            for (long j = 0; j < width; ++j) yn[j] = 1.0f + g * shared[j];
        else
            for (long j = 0; j < width; ++j) yn[j] = 1.0f;
        for (long e = 0; e < E; ++e) {
            const float we = w[e], *row = experts + e * width;
            for (long j = 0; j < width; ++j) yn[j] += we * row[j];
        }
        for (long j = 0; j < width; ++j) yn[j] = on[j] + (dn[j] * delta_scale) * yn[j];
    }
    return 0;
}

/* Training (autograd) entries for the default selection only: soft Auto Top-K without a cap, so x = p - threshold *
 * max p. The forward writes probs, weights and each token's two logit scales (inv_h, inv_d), which the scales are:
 * computed without gradient, as routing._token_logits does; jitter multiplies the logits by noise (drawn by torch).
 * The backward maps the gradients of weights and probs (g_p may be NULL) to those of the two routed slices, as
 * autograd would through routing.py's ops (amax shares its gradient evenly between tied maxima, softplus is linear
 * past its threshold of 20). Tokens are independent: with OpenMP, `threads` threads share them (the same results for
 * any count); the caller passes 1 for small calls. */
int lime_route_train_forward(const float *h, long h_stride, const float *d, long d_stride, const float *noise,
                             long n_tokens, long E, float c_h, float c_d, float floor2, float eps, float threshold,
                             float inv_t, float *probs, float *weights, float *scales, int threads) {
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
#endif
    for (long n = 0; n < n_tokens; ++n) {
        float logits[LIME_MAX_EXPERTS], gated[LIME_MAX_EXPERTS];
        const float *hn = h + n * h_stride, *dn = d + n * d_stride;
        float *p = probs + n * E, *w = weights + n * E;
        float s_h = 0.0f, s_d = 0.0f;
        for (long e = 0; e < E; ++e) {
            s_h += hn[e] * hn[e];
            s_d += dn[e] * dn[e];
        }
        const float m_h = s_h / (float)E + eps;
        const float inv_h = c_h / sqrtf(m_h), inv_d = c_d / sqrtf(s_d / (float)E + floor2 * m_h);
        scales[2 * n] = inv_h;
        scales[2 * n + 1] = inv_d;
        for (long e = 0; e < E; ++e) {
            logits[e] = inv_h * hn[e] + inv_d * dn[e];
            if (noise) logits[e] *= noise[n * E + e];
        }
        softmax(logits, p, E);
        float top = p[0];
        for (long e = 1; e < E; ++e) top = p[e] > top ? p[e] : top;
        for (long e = 0; e < E; ++e) {
            const float x = p[e] - threshold * top, z = -x * inv_t;
            gated[e] = logits[e] + inv_t * (z > 20.0f ? x : log1pf(expf(z)) / (-inv_t));
        }
        softmax(gated, w, E);
    }
    return 0;
}

int lime_route_train_backward(const float *scales, const float *noise, const float *probs, const float *weights,
                              const float *grad_w, const float *grad_p, long n_tokens, long E, float threshold,
                              float inv_t, float *grad_h, float *grad_d, int threads) {
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
#endif
    for (long n = 0; n < n_tokens; ++n) {
        float g_x[LIME_MAX_EXPERTS], g_gated[LIME_MAX_EXPERTS], g_p[LIME_MAX_EXPERTS];
        const float *p = probs + n * E, *w = weights + n * E, *gw = grad_w + n * E;
        float dot_w = 0.0f, top = p[0];
        for (long e = 0; e < E; ++e) dot_w += w[e] * gw[e];
        for (long e = 1; e < E; ++e) top = p[e] > top ? p[e] : top;
        float g_top = 0.0f;
        long ties = 0;
        for (long e = 0; e < E; ++e) {
            g_gated[e] = w[e] * (gw[e] - dot_w);  /* softmax backward */
            const float x = p[e] - threshold * top, z = -x * inv_t;
            const float slope = z > 20.0f ? 1.0f : expf(z) / (expf(z) + 1.0f);  /* softplus backward */
            g_x[e] = g_gated[e] * inv_t * slope;
            g_top -= threshold * g_x[e];
            ties += p[e] == top;
        }
        float dot_p = 0.0f;
        for (long e = 0; e < E; ++e) {
            g_p[e] = (grad_p ? grad_p[n * E + e] : 0.0f) + g_x[e] + (p[e] == top ? g_top / (float)ties : 0.0f);
            dot_p += p[e] * g_p[e];
        }
        for (long e = 0; e < E; ++e) {
            float g_logit = g_gated[e] + p[e] * (g_p[e] - dot_p);
            if (noise) g_logit *= noise[n * E + e];
            grad_h[n * E + e] = scales[2 * n] * g_logit;
            grad_d[n * E + e] = scales[2 * n + 1] * g_logit;
        }
    }
    return 0;
}
