/* petune's bf16 CPU kernels: elementwise backward passes and the loss's softmax, one pass over each row.
 *
 * Plain C on raw pointers (bf16 as uint16_t), built on first use by petune/kernels/native.py with the
 * machine's C compiler and called through ctypes; no Python or torch headers. Arithmetic is fp32, and a bf16
 * result is rounded to nearest even, as torch rounds.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float from_bf16(uint16_t value) {
    uint32_t bits = (uint32_t)value << 16;
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

static inline uint16_t to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u); /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* e^x to about 2 units in the last place of fp32, written so that compilers vectorise it inline without a vector
 * math library (glibc's libmvec; clang and other C libraries have none): x = n ln2 + r with |r| <= ln2 / 2, e^r by
 * Cephes' expf polynomial, 2^n from the exponent bits. Below -87 (e^x under fp32's smallest normal) it returns
 * e^-87, never a subnormal. */
static inline float exp_fp32(float x) {
    x = fminf(fmaxf(x, -87.0f), 88.0f);
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* y = bf16(bf16(x * rstd) * weight) with rstd = 1 / sqrt(mean(x^2) + eps), per row of `width`; rstd kept. The
 * two roundings are transformers' (the normalised row is cast to the input's dtype before the weight's product). */
static void rms_norm_forward_rows(const uint16_t *x, const uint16_t *weight, float eps, uint16_t *y, float *rstd,
                                  int64_t width, int64_t first, int64_t last) {
    for (int64_t row = first; row < last; row++) {
        const uint16_t *in = x + row * width;
        uint16_t *out = y + row * width;
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < width; i++) squares += from_bf16(in[i]) * from_bf16(in[i]);
        const float r = 1.0f / sqrtf(squares / (float)width + eps);
        rstd[row] = r;
#pragma omp simd
        for (int64_t i = 0; i < width; i++)
            out[i] = to_bf16(from_bf16(to_bf16(from_bf16(in[i]) * r)) * from_bf16(weight[i]));
    }
}

/* d loss / d x of weight * bf16(x * rstd): gn = bf16(grad_y * weight), n = x * rstd,
 * grad_x = rstd * (gn - n * mean(gn * n)), per row of `width`. */
static void rms_norm_backward_rows(const uint16_t *grad_y, const uint16_t *x, const uint16_t *weight,
                                   const float *rstd, uint16_t *grad_x, int64_t width, int64_t first,
                                   int64_t last) {
    for (int64_t row = first; row < last; row++) {
        const uint16_t *g = grad_y + row * width, *in = x + row * width;
        uint16_t *out = grad_x + row * width;
        const float r = rstd[row];
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < width; i++)
            dot += from_bf16(to_bf16(from_bf16(g[i]) * from_bf16(weight[i]))) * (from_bf16(in[i]) * r);
        const float mean = dot / (float)width;
#pragma omp simd
        for (int64_t i = 0; i < width; i++) {
            const float gn = from_bf16(to_bf16(from_bf16(g[i]) * from_bf16(weight[i])));
            out[i] = to_bf16((gn - from_bf16(in[i]) * r * mean) * r);
        }
    }
}

/* bf16(bf16(silu(gate)) * up) for elements [first, last): torch's two roundings. */
static void swiglu_forward_range(const uint16_t *gate, const uint16_t *up, uint16_t *out, int64_t first, int64_t last) {
#pragma omp simd
    for (int64_t i = first; i < last; i++) {
        const float a = from_bf16(gate[i]);
        out[i] = to_bf16(from_bf16(to_bf16(a / (1.0f + exp_fp32(-a)))) * from_bf16(up[i]));
    }
}

/* d loss / d gate and d loss / d up of silu(gate) * up, for elements [first, last). */
static void swiglu_backward_range(const uint16_t *grad, const uint16_t *gate, const uint16_t *up,
                                  uint16_t *grad_gate, uint16_t *grad_up, int64_t first, int64_t last) {
#pragma omp simd
    for (int64_t i = first; i < last; i++) {
        const float g = from_bf16(grad[i]), a = from_bf16(gate[i]);
        const float sigmoid = 1.0f / (1.0f + exp_fp32(-a));
        grad_up[i] = to_bf16(g * a * sigmoid);
        grad_gate[i] = to_bf16(g * from_bf16(up[i]) * sigmoid * (1.0f + a * (1.0f - sigmoid)));
    }
}

/* values[i] = e^(values[i] - shift); returns their sum. Not inlined: inside the OpenMP loop's body gcc left this
 * loop scalar (5x slower). */
__attribute__((noinline)) static float exp_shifted(float *values, float shift, int64_t count) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < count; i++) {
        values[i] = exp_fp32(values[i] - shift);
        sum += values[i];
    }
    return sum;
}

/* Cross-entropy of rows of bf16 logits (width `vocab`) against `targets`: each row's loss
 * (logsumexp - chosen logit) goes to `losses`, and the row is overwritten by its gradient,
 * bf16(softmax - onehot(target)). `scratch` holds `vocab` floats. */
static void cross_entropy_rows(uint16_t *logits, const int64_t *targets, float *losses, float *scratch,
                               int64_t vocab, int64_t first, int64_t last) {
    for (int64_t row = first; row < last; row++) {
        uint16_t *z = logits + row * vocab;
        for (int64_t i = 0; i < vocab; i++) scratch[i] = from_bf16(z[i]);
        float top = scratch[0]; /* not -INFINITY: built with -ffast-math, which assumes finite values */
        for (int64_t i = 1; i < vocab; i++) top = fmaxf(top, scratch[i]);
        const float sum = exp_shifted(scratch, top, vocab);
        const int64_t target = targets[row];
        losses[row] = logf(sum) + top - from_bf16(z[target]);
#pragma omp simd
        for (int64_t i = 0; i < vocab; i++) z[i] = to_bf16(scratch[i] / sum);
        z[target] = to_bf16(scratch[target] / sum - 1.0f);
    }
}

/* ---- the entry points: rows split between `threads` OpenMP threads. Built with -fopenmp, the library
 * needs libgomp.so.1, and in a process that has torch loaded that is torch's own (same name): its threads,
 * already running, do the work, rather than new threads competing with them for the cores. ---- */

int petune_rms_norm_forward(const uint16_t *x, const uint16_t *weight, float eps, uint16_t *y, float *rstd,
                            int64_t rows, int64_t width, int threads) {
    const int64_t step = 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t first = 0; first < rows; first += step)
        rms_norm_forward_rows(x, weight, eps, y, rstd, width, first, first + step < rows ? first + step : rows);
    return 0;
}

int petune_swiglu_forward(const uint16_t *gate, const uint16_t *up, uint16_t *out, int64_t count, int threads) {
    const int64_t step = 16384;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t first = 0; first < count; first += step)
        swiglu_forward_range(gate, up, out, first, first + step < count ? first + step : count);
    return 0;
}

int petune_rms_norm_backward(const uint16_t *grad_y, const uint16_t *x, const uint16_t *weight, const float *rstd,
                             uint16_t *grad_x, int64_t rows, int64_t width, int threads) {
    const int64_t step = 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t first = 0; first < rows; first += step)
        rms_norm_backward_rows(grad_y, x, weight, rstd, grad_x, width, first, first + step < rows ? first + step : rows);
    return 0;
}

int petune_swiglu_backward(const uint16_t *grad, const uint16_t *gate, const uint16_t *up, uint16_t *grad_gate,
                           uint16_t *grad_up, int64_t count, int threads) {
    const int64_t step = 16384;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t first = 0; first < count; first += step)
        swiglu_backward_range(grad, gate, up, grad_gate, grad_up, first, first + step < count ? first + step : count);
    return 0;
}

int petune_cross_entropy(uint16_t *logits, const int64_t *targets, float *losses, int64_t rows, int64_t vocab,
                         int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *scratch = malloc((size_t)vocab * sizeof(float));
        if (scratch == NULL) failed = 1;
#pragma omp for schedule(static)
        for (int64_t row = 0; row < rows; row++)
            if (scratch != NULL) cross_entropy_rows(logits, targets, losses, scratch, vocab, row, row + 1);
        free(scratch);
    }
    return failed;
}
