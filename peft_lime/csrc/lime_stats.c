/* LiME's routing statistics of recorded layer calls, added to their sums in one pass (peft_lime/native_stats.py).
 *
 * The same sums as peft_lime/stats.py's RoutingStats._accumulate, which is the reference: in a compiled training
 * step those are ~60 tensor ops per wrapped layer that inductor generated code for (most of LiME's compile time
 * over plain LoRA's), and in an eager fold ~40 dispatches. Here: probs (N, E) float32, selected (N, E) bytes (0/1),
 * w (N,) token weights (NULL: all 1), the tokens split into n_calls consecutive calls of call_len[i] tokens each
 * (the per-call balance terms). Rows with a non-finite probability are counted in nonfinite and left out of the
 * rest. Per-call and per-token sums are accumulated in double, then added to the float32 sums.
 *
 * sums: tokens, calls, entropy, active, probs[E], load[E], importance, kl, active_hist[E + 1], nonfinite.
 */
#include <math.h>

#define LIME_MAX_EXPERTS 64

/* The two balance terms of mean probabilities pbar (E,): |pbar|^2 (importance = E |pbar|^2 - 1 where the mean has
 * tokens) and kl = sum_e pbar_e log(max(pbar_e, 1e-12) E), as routing.balance_terms_of_mean computes them. */
static void terms_of_mean(const double *pbar, long E, double *sq, double *kl) {
    *sq = *kl = 0.0;
    for (long e = 0; e < E; ++e) {
        *sq += pbar[e] * pbar[e];
        *kl += pbar[e] * log((pbar[e] > 1e-12 ? pbar[e] : 1e-12) * (double)E);
    }
}

int lime_stats_record(const float *probs, const unsigned char *selected, const float *w, const long *call_len,
                      long n_calls, long E, float *tokens, float *calls, float *entropy, float *active,
                      float *probs_sum, float *load, float *importance, float *kl, float *active_hist,
                      float *nonfinite) {
    double pw[LIME_MAX_EXPERTS], total_p[LIME_MAX_EXPERTS], total_load[LIME_MAX_EXPERTS];
    double hist[LIME_MAX_EXPERTS + 1];
    double s_tokens = 0.0, s_calls = 0.0, s_entropy = 0.0, s_active = 0.0, s_imp = 0.0, s_kl = 0.0, s_bad = 0.0;
    const double log_e = E > 1 ? log((double)E) : 1.0;
    for (long e = 0; e < E; ++e) total_p[e] = total_load[e] = 0.0;
    for (long e = 0; e <= E; ++e) hist[e] = 0.0;
    long n = 0;
    for (long c = 0; c < n_calls; ++c) {
        double call_w = 0.0;
        for (long e = 0; e < E; ++e) pw[e] = 0.0;
        for (long end = n + call_len[c]; n < end; ++n) {
            const float *p = probs + n * E;
            const unsigned char *sel = selected + n * E;
            const double wn = w ? (double)w[n] : 1.0;
            int finite = 1;
            for (long e = 0; e < E; ++e) finite &= isfinite(p[e]) != 0;
            if (!finite) {
                s_bad += wn;
                continue;
            }
            double ent = 0.0;
            long n_active = 0;
            for (long e = 0; e < E; ++e) {
                const double pe = (double)p[e];
                pw[e] += pe * wn;
                ent -= pe * log(pe > 1e-12 ? pe : 1e-12);
                n_active += sel[e] != 0;
                total_load[e] += sel[e] ? wn : 0.0;
            }
            call_w += wn;
            s_entropy += E > 1 ? wn * ent / log_e : 0.0;
            s_active += wn * (double)n_active;
            hist[n_active] += wn;
        }
        if (call_w > 0.0) {  /* a call without a valid token has no balance terms */
            const double count = call_w > 1.0 ? call_w : 1.0;
            double pbar[LIME_MAX_EXPERTS], sq, kl;
            for (long e = 0; e < E; ++e) pbar[e] = pw[e] / count;
            terms_of_mean(pbar, E, &sq, &kl);
            s_imp += (double)E * sq - 1.0;
            s_kl += kl;
            s_calls += 1.0;
        }
        for (long e = 0; e < E; ++e) total_p[e] += pw[e];
        s_tokens += call_w;
    }
    *tokens += (float)s_tokens;
    *calls += (float)s_calls;
    *entropy += (float)s_entropy;
    *active += (float)s_active;
    *importance += (float)s_imp;
    *kl += (float)s_kl;
    *nonfinite += (float)s_bad;
    for (long e = 0; e < E; ++e) {
        probs_sum[e] += (float)total_p[e];
        load[e] += (float)total_load[e];
    }
    for (long e = 0; e <= E; ++e) active_hist[e] += (float)hist[e];
    return 0;
}

/* The micro-batch balance loss of one layer call and its gradient (peft_lime/native_balance.py; the reference is
 * routing.balance_terms): pbar = sum_n w_n p_n / max(sum_n w_n, 1) over the valid tokens (w NULL: all, pbar = the
 * mean), importance = (E |pbar|^2 - 1) [sum w > 0], kl = sum_e pbar_e log(max(pbar_e, 1e-12) E),
 * aux = (c_imp importance + c_kl kl) * scale. */
static double balance_mean(const float *probs, const float *w, long n_tokens, long E, double *pbar) {
    double total = 0.0;
    for (long e = 0; e < E; ++e) pbar[e] = 0.0;
    for (long n = 0; n < n_tokens; ++n) {
        const double wn = w ? (double)w[n] : 1.0;
        total += wn;
        for (long e = 0; e < E; ++e) pbar[e] += wn * (double)probs[n * E + e];
    }
    const double count = total > 1.0 ? total : 1.0;
    for (long e = 0; e < E; ++e) pbar[e] /= count;
    return total;
}

int lime_balance_forward(const float *probs, const float *w, long n_tokens, long E, float c_imp, float c_kl,
                         float scale, float *out) {
    double pbar[LIME_MAX_EXPERTS], sq, kl;
    const double total = balance_mean(probs, w, n_tokens, E, pbar);
    terms_of_mean(pbar, E, &sq, &kl);
    const double importance = total > 0.0 ? (double)E * sq - 1.0 : 0.0;
    out[0] = (float)(((double)c_imp * importance + (double)c_kl * kl) * (double)scale);
    out[1] = (float)importance;
    out[2] = (float)kl;
    return 0;
}

/* grad_probs[n, e] = grad_aux * scale * w_n / max(sum w, 1) * (c_imp [sum w > 0] 2 E pbar_e
 *                    + c_kl (log(max(pbar_e, 1e-12) E) + [pbar_e >= 1e-12])), as autograd derives it. */
int lime_balance_backward(const float *probs, const float *w, long n_tokens, long E, float c_imp, float c_kl,
                          float scale, float grad_aux, float *grad_probs) {
    double pbar[LIME_MAX_EXPERTS], g[LIME_MAX_EXPERTS];
    const double total = balance_mean(probs, w, n_tokens, E, pbar);
    const double count = total > 1.0 ? total : 1.0, outer = (double)grad_aux * (double)scale / count;
    for (long e = 0; e < E; ++e) {
        const double clamped = pbar[e] > 1e-12 ? pbar[e] : 1e-12;
        g[e] = (total > 0.0 ? (double)c_imp * 2.0 * (double)E * pbar[e] : 0.0)
               + (double)c_kl * (log(clamped * (double)E) + (pbar[e] >= 1e-12 ? 1.0 : 0.0));
    }
    for (long n = 0; n < n_tokens; ++n) {
        const double wn = (w ? (double)w[n] : 1.0) * outer;
        for (long e = 0; e < E; ++e) grad_probs[n * E + e] = (float)(wn * g[e]);
    }
    return 0;
}
