using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using X86 = System.Runtime.Intrinsics.X86;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Kernels.Cpu;

/// <summary>The 256-bit vector helpers shared by the C# CPU kernels (paged attention, small-batch linear).</summary>
internal static unsafe class Simd
{
    /// <summary>a * b + c, fused where the CPU has FMA.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> Fma(Vector256<float> a, Vector256<float> b, Vector256<float> c) =>
        System.Runtime.Intrinsics.X86.Fma.IsSupported ? System.Runtime.Intrinsics.X86.Fma.MultiplyAdd(a, b, c) : a * b + c;

    /// <summary>The dot product of two float vectors of length <paramref name="n"/>, four accumulators deep.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining | MethodImplOptions.AggressiveOptimization)]
    public static float Dot(float* a, float* b, int n)
    {
        int i = 0;
        var s0 = Vector256<float>.Zero;
        var s1 = Vector256<float>.Zero;
        var s2 = Vector256<float>.Zero;
        var s3 = Vector256<float>.Zero;
        for (; i + 32 <= n; i += 32)
        {
            s0 = Fma(Vector256.Load(a + i), Vector256.Load(b + i), s0);
            s1 = Fma(Vector256.Load(a + i + 8), Vector256.Load(b + i + 8), s1);
            s2 = Fma(Vector256.Load(a + i + 16), Vector256.Load(b + i + 16), s2);
            s3 = Fma(Vector256.Load(a + i + 24), Vector256.Load(b + i + 24), s3);
        }
        for (; i + 8 <= n; i += 8) s0 = Fma(Vector256.Load(a + i), Vector256.Load(b + i), s0);
        float sum = Vector256.Sum((s0 + s1) + (s2 + s3));
        for (; i < n; i++) sum += a[i] * b[i];
        return sum;
    }

    /// <summary>
    /// <see cref="Dot"/> for a weight row streamed from memory: 512-bit where the runtime accelerates it, and the
    /// cache lines of <paramref name="ahead"/> (a row the caller will read soon) requested as it goes, so that the next
    /// rows do not start with cold misses.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static float DotAhead(float* w, float* x, int n, float* ahead)
    {
        int i = 0;
        if (Vector512.IsHardwareAccelerated && X86.Avx512F.IsSupported)
        {
            Vector512<float> s0 = default, s1 = default, s2 = default, s3 = default;
            for (; i + 64 <= n; i += 64)
            {
                X86.Sse.Prefetch0(ahead + i);
                X86.Sse.Prefetch0(ahead + i + 16);
                X86.Sse.Prefetch0(ahead + i + 32);
                X86.Sse.Prefetch0(ahead + i + 48);
                s0 = X86.Avx512F.FusedMultiplyAdd(Vector512.Load(w + i), Vector512.Load(x + i), s0);
                s1 = X86.Avx512F.FusedMultiplyAdd(Vector512.Load(w + i + 16), Vector512.Load(x + i + 16), s1);
                s2 = X86.Avx512F.FusedMultiplyAdd(Vector512.Load(w + i + 32), Vector512.Load(x + i + 32), s2);
                s3 = X86.Avx512F.FusedMultiplyAdd(Vector512.Load(w + i + 48), Vector512.Load(x + i + 48), s3);
            }
            float head = Vector512.Sum((s0 + s1) + (s2 + s3));
            return i == n ? head : head + Dot(w + i, x + i, n - i);
        }
        return Dot(w, x, n);
    }

    /// <summary><see cref="DotAhead"/> for two input rows: each weight vector loaded once feeds both.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Dot2Ahead(float* w, float* x0, float* x1, int n, float* ahead, float* y0, float* y1)
    {
        int i = 0;
        if (Vector512.IsHardwareAccelerated && X86.Avx512F.IsSupported)
        {
            Vector512<float> a0 = default, a1 = default, b0 = default, b1 = default;
            for (; i + 32 <= n; i += 32)
            {
                X86.Sse.Prefetch0(ahead + i);
                X86.Sse.Prefetch0(ahead + i + 16);
                var v = Vector512.Load(w + i);
                var u = Vector512.Load(w + i + 16);
                a0 = X86.Avx512F.FusedMultiplyAdd(v, Vector512.Load(x0 + i), a0);
                a1 = X86.Avx512F.FusedMultiplyAdd(u, Vector512.Load(x0 + i + 16), a1);
                b0 = X86.Avx512F.FusedMultiplyAdd(v, Vector512.Load(x1 + i), b0);
                b1 = X86.Avx512F.FusedMultiplyAdd(u, Vector512.Load(x1 + i + 16), b1);
            }
            float s0 = Vector512.Sum(a0 + a1), s1 = Vector512.Sum(b0 + b1);
            if (i < n)
            {
                s0 += Dot(w + i, x0 + i, n - i);
                s1 += Dot(w + i, x1 + i, n - i);
            }
            *y0 = s0;
            *y1 = s1;
            return;
        }
        *y0 = Dot(w, x0, n);
        *y1 = Dot(w, x1, n);
    }

    /// <summary>(sum a, sum b, sum c, sum d): four horizontal sums reduced together (cheaper than four reductions).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector128<float> Sum4(Vector512<float> a, Vector512<float> b, Vector512<float> c, Vector512<float> d)
    {
        Vector256<float> a2 = a.GetLower() + a.GetUpper(), b2 = b.GetLower() + b.GetUpper();
        Vector256<float> c2 = c.GetLower() + c.GetUpper(), d2 = d.GetLower() + d.GetUpper();
        if (System.Runtime.Intrinsics.X86.Avx.IsSupported)
        {
            var h = System.Runtime.Intrinsics.X86.Avx.HorizontalAdd(
                System.Runtime.Intrinsics.X86.Avx.HorizontalAdd(a2, b2), System.Runtime.Intrinsics.X86.Avx.HorizontalAdd(c2, d2));
            return h.GetLower() + h.GetUpper();
        }
        return Vector128.Create(Vector256.Sum(a2), Vector256.Sum(b2), Vector256.Sum(c2), Vector256.Sum(d2));
    }

    /// <summary>
    /// dst[i * dstStride + j] = src[j * srcStride + i] for an 8 x 8 block, in registers: pairs of rows interleaved, then
    /// quads, then the 128-bit halves exchanged (one 32-byte load and store per row).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Transpose8x8(float* src, long srcStride, float* dst, long dstStride)
    {
        Vector256<float> v0 = Vector256.Load(src), v1 = Vector256.Load(src + srcStride), v2 = Vector256.Load(src + 2 * srcStride), v3 = Vector256.Load(src + 3 * srcStride),
            v4 = Vector256.Load(src + 4 * srcStride), v5 = Vector256.Load(src + 5 * srcStride), v6 = Vector256.Load(src + 6 * srcStride), v7 = Vector256.Load(src + 7 * srcStride);
        Vector256<float> p0 = X86.Avx.UnpackLow(v0, v1), p1 = X86.Avx.UnpackHigh(v0, v1), p2 = X86.Avx.UnpackLow(v2, v3), p3 = X86.Avx.UnpackHigh(v2, v3),
            p4 = X86.Avx.UnpackLow(v4, v5), p5 = X86.Avx.UnpackHigh(v4, v5), p6 = X86.Avx.UnpackLow(v6, v7), p7 = X86.Avx.UnpackHigh(v6, v7);
        Vector256<float> q0 = X86.Avx.Shuffle(p0, p2, 0x44), q1 = X86.Avx.Shuffle(p0, p2, 0xEE), q2 = X86.Avx.Shuffle(p1, p3, 0x44), q3 = X86.Avx.Shuffle(p1, p3, 0xEE),
            q4 = X86.Avx.Shuffle(p4, p6, 0x44), q5 = X86.Avx.Shuffle(p4, p6, 0xEE), q6 = X86.Avx.Shuffle(p5, p7, 0x44), q7 = X86.Avx.Shuffle(p5, p7, 0xEE);
        X86.Avx.Permute2x128(q0, q4, 0x20).Store(dst);
        X86.Avx.Permute2x128(q1, q5, 0x20).Store(dst + dstStride);
        X86.Avx.Permute2x128(q2, q6, 0x20).Store(dst + 2 * dstStride);
        X86.Avx.Permute2x128(q3, q7, 0x20).Store(dst + 3 * dstStride);
        X86.Avx.Permute2x128(q0, q4, 0x31).Store(dst + 4 * dstStride);
        X86.Avx.Permute2x128(q1, q5, 0x31).Store(dst + 5 * dstStride);
        X86.Avx.Permute2x128(q2, q6, 0x31).Store(dst + 6 * dstStride);
        X86.Avx.Permute2x128(q3, q7, 0x31).Store(dst + 7 * dstStride);
    }

    /// <summary>The data of a contiguous float32 CPU tensor (valid while the tensor lives).</summary>
    public static float* Pointer(Tensor t) => (float*)Unsafe.AsPointer(ref MemoryMarshal.GetReference(t.bytes));

    /// <summary>The data of a contiguous bfloat16 CPU tensor, as raw 16-bit patterns (valid while the tensor lives).</summary>
    public static ushort* Bf16Pointer(Tensor t) => (ushort*)Unsafe.AsPointer(ref MemoryMarshal.GetReference(t.bytes));
}
