using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Kernels.Cpu;

/// <summary>
/// The elementwise work around a decoder layer's matrix products, fused into single passes over float32 CPU rows:
/// RMSNorm (with the residual add before it), per-head q/k RMSNorm with the rotary embedding, and SiLU(gate) * up.
/// libtorch runs each of these as 5-15 separate ops per layer (each a pass over memory and a dispatch), and its
/// OpenMP workers then compete with the engine's own parallel kernels for the cores. <see cref="Supports"/> says
/// when these apply; otherwise <see cref="Models.CausalLm"/> uses the libtorch expressions, which these are tested against.
/// </summary>
internal static unsafe class CpuLayerOps
{
    /// <summary>Elements per parallel chunk: below this a pass runs on the calling thread.</summary>
    private const int ParallelGrain = 1 << 15;

    public static bool Supports(Tensor t) =>
        t.dtype == ScalarType.Float32 && t.device_type == TorchSharp.DeviceType.CPU;

    /// <summary>RMSNorm of each row of <paramref name="x"/> [rows, dim] scaled by <paramref name="weight"/> [dim].</summary>
    public static Tensor RmsNorm(Tensor x, Tensor weight, double eps)
    {
        using var xc = x.contiguous();
        int rows = (int)xc.shape[0], dim = (int)xc.shape[1];
        var y = empty([rows, dim], ScalarType.Float32);
        float* xp = Simd.Pointer(xc), wp = Simd.Pointer(weight), yp = Simd.Pointer(y);
        ForRows(rows, dim, (from, to) =>
        {
            for (int r = from; r < to; r++) NormRow(xp + (long)r * dim, wp, yp + (long)r * dim, dim, (float)eps);
        });
        return y;
    }

    /// <summary>hidden = x + delta, normed = RMSNorm(hidden) * weight, in one pass over each row.</summary>
    public static (Tensor Hidden, Tensor Normed) AddRmsNorm(Tensor x, Tensor delta, Tensor weight, double eps)
    {
        using var xc = x.contiguous();
        using var dc = delta.contiguous();
        int rows = (int)xc.shape[0], dim = (int)xc.shape[1];
        var hidden = empty([rows, dim], ScalarType.Float32);
        var normed = empty([rows, dim], ScalarType.Float32);
        float* xp = Simd.Pointer(xc), dp = Simd.Pointer(dc), wp = Simd.Pointer(weight), hp = Simd.Pointer(hidden), np = Simd.Pointer(normed);
        ForRows(rows, dim, (from, to) =>
        {
            for (int r = from; r < to; r++)
            {
                long o = (long)r * dim;
                Add(xp + o, dp + o, hp + o, dim);
                NormRow(hp + o, wp, np + o, dim, (float)eps);
            }
        });
        return (hidden, normed);
    }

    /// <summary>
    /// Splits the fused projection <paramref name="qkv"/> [tokens, (heads + 2 kvHeads) * headDim] into contiguous q
    /// [tokens, heads, headDim], k and v [tokens, kvHeads, headDim], applying the per-head RMSNorm (when the weights are
    /// given) and the rotary embedding (rotate-half form, <paramref name="cos"/> and <paramref name="sin"/> float32
    /// [tokens, headDim]) to q and k.
    /// </summary>
    public static (Tensor Q, Tensor K, Tensor V) SplitNormRope(Tensor qkv, int heads, int kvHeads, int headDim,
        Tensor? qNorm, Tensor? kNorm, double eps, Tensor cos, Tensor sin)
    {
        using var src = qkv.contiguous();
        using var cc = cos.contiguous();
        using var sc = sin.contiguous();
        int tokens = (int)src.shape[0], width = (heads + 2 * kvHeads) * headDim;
        var q = empty([tokens, heads, headDim], ScalarType.Float32);
        var k = empty([tokens, kvHeads, headDim], ScalarType.Float32);
        var v = empty([tokens, kvHeads, headDim], ScalarType.Float32);
        float* s = Simd.Pointer(src), qp = Simd.Pointer(q), kp = Simd.Pointer(k), vp = Simd.Pointer(v);
        float* cp = Simd.Pointer(cc), sp = Simd.Pointer(sc);
        float* qn = qNorm is null ? null : Simd.Pointer(qNorm), kn = kNorm is null ? null : Simd.Pointer(kNorm);
        ForRows(tokens, width, (from, to) =>
        {
            float* tmp = stackalloc float[headDim];
            for (int t = from; t < to; t++)
            {
                float* row = s + (long)t * width, c = cp + (long)t * headDim, sn = sp + (long)t * headDim;
                for (int h = 0; h < heads; h++)
                    HeadNormRope(row + h * headDim, qn, eps, c, sn, qp + ((long)t * heads + h) * headDim, tmp, headDim);
                for (int h = 0; h < kvHeads; h++)
                    HeadNormRope(row + (heads + h) * headDim, kn, eps, c, sn, kp + ((long)t * kvHeads + h) * headDim, tmp, headDim);
                new ReadOnlySpan<float>(row + (heads + kvHeads) * headDim, kvHeads * headDim)
                    .CopyTo(new Span<float>(vp + (long)t * kvHeads * headDim, kvHeads * headDim));
            }
        });
        return (q, k, v);
    }

    /// <summary>SiLU(gate) * up for <paramref name="gateUp"/> = [rows, 2 * intermediate] (gate first).</summary>
    public static Tensor SiluMul(Tensor gateUp, int intermediate)
    {
        using var gc = gateUp.contiguous();
        int rows = (int)gc.shape[0];
        var y = empty([rows, intermediate], ScalarType.Float32);
        float* gp = Simd.Pointer(gc), yp = Simd.Pointer(y);
        ForRows(rows, intermediate, (from, to) =>
        {
            for (int r = from; r < to; r++)
            {
                float* g = gp + (long)r * 2 * intermediate, u = g + intermediate, o = yp + (long)r * intermediate;
                int i = 0;
                for (; i + 8 <= intermediate; i += 8)
                {
                    var gv = Vector256.Load(g + i);
                    var silu = gv / (Vector256<float>.One + Vector256.Exp(-gv));
                    (silu * Vector256.Load(u + i)).Store(o + i);
                }
                for (; i < intermediate; i++) o[i] = g[i] / (1f + MathF.Exp(-g[i])) * u[i];
            }
        });
        return y;
    }

    private static void ForRows(int rows, int rowElements, Action<int, int> body)
    {
        long total = (long)rows * rowElements;
        int chunks = (int)Math.Min(rows, Math.Min(Environment.ProcessorCount * 4, total / ParallelGrain));
        if (chunks <= 1)
        {
            body(0, rows);
            return;
        }
        CpuWorkers.Shared.For(chunks, c =>
            body((int)((long)rows * c / chunks), (int)((long)rows * (c + 1) / chunks)));
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Add(float* a, float* b, float* y, int n)
    {
        int i = 0;
        for (; i + 8 <= n; i += 8) (Vector256.Load(a + i) + Vector256.Load(b + i)).Store(y + i);
        for (; i < n; i++) y[i] = a[i] + b[i];
    }

    /// <summary>y = x / sqrt(mean(x^2) + eps) * w (w may be null: no scale).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void NormRow(float* x, float* w, float* y, int n, float eps)
    {
        int i = 0;
        var acc = Vector256<float>.Zero;
        for (; i + 8 <= n; i += 8)
        {
            var v = Vector256.Load(x + i);
            acc = Simd.Fma(v, v, acc);
        }
        float sum = Vector256.Sum(acc);
        for (; i < n; i++) sum += x[i] * x[i];
        float scale = 1f / MathF.Sqrt(sum / n + eps);
        var sv = Vector256.Create(scale);
        i = 0;
        if (w is null)
        {
            for (; i + 8 <= n; i += 8) (Vector256.Load(x + i) * sv).Store(y + i);
            for (; i < n; i++) y[i] = x[i] * scale;
            return;
        }
        for (; i + 8 <= n; i += 8) (Vector256.Load(x + i) * sv * Vector256.Load(w + i)).Store(y + i);
        for (; i < n; i++) y[i] = w[i] * (x[i] * scale);
    }

    /// <summary>One head: optional RMSNorm, then rotate-half RoPE: y = x * cos + [-x2, x1] * sin.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void HeadNormRope(float* x, float* norm, double eps, float* cos, float* sin, float* y, float* tmp, int headDim)
    {
        float* h = x;
        if (norm is not null)
        {
            NormRow(x, norm, tmp, headDim, (float)eps);
            h = tmp;
        }
        int half = headDim / 2, i = 0;
        for (; i + 8 <= half; i += 8)
        {
            var x1 = Vector256.Load(h + i);
            var x2 = Vector256.Load(h + i + half);
            (x1 * Vector256.Load(cos + i) - x2 * Vector256.Load(sin + i)).Store(y + i);
            (x2 * Vector256.Load(cos + i + half) + x1 * Vector256.Load(sin + i + half)).Store(y + i + half);
        }
        for (; i < half; i++)
        {
            float x1 = h[i], x2 = h[i + half];
            y[i] = x1 * cos[i] - x2 * sin[i];
            y[i + half] = x2 * cos[i + half] + x1 * sin[i + half];
        }
    }
}
