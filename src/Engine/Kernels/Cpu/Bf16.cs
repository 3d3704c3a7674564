using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace LocalVllm.Engine.Kernels.Cpu;

/// <summary>
/// bfloat16 weights read by the float32 kernels. A bfloat16 is the upper half of a float32, so widening is a 16-bit
/// shift and exact: a product over widened weights equals the float32 product over the same values, up to the order
/// of the additions. Everything accumulates in float32. The vector paths use the cross-platform
/// <see cref="Vector256"/> API (AVX2 when the CPU has it, a software fallback otherwise); the single-row dot product
/// widens sixteen at a time into 512-bit registers where the runtime accelerates them.
/// </summary>
internal static unsafe class Bf16
{
    /// <summary>Sixteen bfloat16 at <paramref name="p"/> as two float32 vectors (elements 0-7, 8-15).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static (Vector256<float> Low, Vector256<float> High) Load16(ushort* p)
    {
        var (lo, hi) = Vector256.Widen(Vector256.Load(p));
        return (Vector256.ShiftLeft(lo, 16).AsSingle(), Vector256.ShiftLeft(hi, 16).AsSingle());
    }

    /// <summary>Sixteen bfloat16 at <paramref name="p"/> as one 512-bit float32 vector (AVX-512 only).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Load16Wide(ushort* p) =>
        Avx512F.ShiftLeftLogical(Avx512F.ConvertToVector512UInt32(Vector256.Load(p)), 16).AsSingle();

    /// <summary>One bfloat16 as a float32.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float ToSingle(ushort b) => BitConverter.Int32BitsToSingle(b << 16);

    /// <summary>dst[i] = src[i] widened, for <paramref name="n"/> elements.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Widen(ushort* src, float* dst, long n)
    {
        long i = 0;
        if (Vector512.IsHardwareAccelerated && Avx512F.IsSupported)
            for (; i + 16 <= n; i += 16) Load16Wide(src + i).Store(dst + i);
        for (; i + 16 <= n; i += 16)
        {
            var (lo, hi) = Load16(src + i);
            lo.Store(dst + i);
            hi.Store(dst + i + 8);
        }
        for (; i < n; i++) dst[i] = ToSingle(src[i]);
    }

    /// <summary>The dot product of bfloat16 <paramref name="w"/> and float32 <paramref name="x"/> of length <paramref name="n"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static float Dot(ushort* w, float* x, int n)
    {
        int i = 0;
        float sum;
        if (Vector512.IsHardwareAccelerated && Avx512F.IsSupported)
        {
            Vector512<float> s0 = default, s1 = default, s2 = default, s3 = default;
            for (; i + 64 <= n; i += 64)
            {
                s0 = Avx512F.FusedMultiplyAdd(Load16Wide(w + i), Vector512.Load(x + i), s0);
                s1 = Avx512F.FusedMultiplyAdd(Load16Wide(w + i + 16), Vector512.Load(x + i + 16), s1);
                s2 = Avx512F.FusedMultiplyAdd(Load16Wide(w + i + 32), Vector512.Load(x + i + 32), s2);
                s3 = Avx512F.FusedMultiplyAdd(Load16Wide(w + i + 48), Vector512.Load(x + i + 48), s3);
            }
            for (; i + 16 <= n; i += 16) s0 = Avx512F.FusedMultiplyAdd(Load16Wide(w + i), Vector512.Load(x + i), s0);
            sum = Vector512.Sum((s0 + s1) + (s2 + s3));
        }
        else
        {
            Vector256<float> s0 = default, s1 = default, s2 = default, s3 = default;
            for (; i + 32 <= n; i += 32)
            {
                var (a, b) = Load16(w + i);
                var (c, d) = Load16(w + i + 16);
                s0 = Simd.Fma(a, Vector256.Load(x + i), s0);
                s1 = Simd.Fma(b, Vector256.Load(x + i + 8), s1);
                s2 = Simd.Fma(c, Vector256.Load(x + i + 16), s2);
                s3 = Simd.Fma(d, Vector256.Load(x + i + 24), s3);
            }
            for (; i + 16 <= n; i += 16)
            {
                var (a, b) = Load16(w + i);
                s0 = Simd.Fma(a, Vector256.Load(x + i), s0);
                s1 = Simd.Fma(b, Vector256.Load(x + i + 8), s1);
            }
            sum = Vector256.Sum((s0 + s1) + (s2 + s3));
        }
        for (; i < n; i++) sum += ToSingle(w[i]) * x[i];
        return sum;
    }

    // ---- paired layout: no shuffles in the inner loop ------------------------------------------------------------
    // Read as 32-bit lanes, a run of bfloat16 holds element 2j in the low half of lane j and element 2j + 1 in the high
    // half: (lane << 16) and (lane & 0xFFFF0000) are those two elements as float32, with no cross-lane shuffle. The
    // input row is rearranged once per call to match (per block of PairBlock elements: the even ones, then the odd
    // ones), and every weight row is then dotted with one load, one shift, one AND and two FMAs per block.

    /// <summary>Elements per block of the paired layout (two vectors of float32).</summary>
    public static int PairBlock => Vector512.IsHardwareAccelerated && Avx512F.IsSupported ? 32 : 16;

    /// <summary>Rearranges <paramref name="x"/> (length a multiple of <see cref="PairBlock"/>) into the paired layout.</summary>
    public static void Deinterleave(float* x, float* dst, int n)
    {
        int block = PairBlock, half = block / 2;
        for (int b = 0; b < n; b += block)
            for (int j = 0; j < half; j++)
            {
                dst[b + j] = x[b + 2 * j];
                dst[b + half + j] = x[b + 2 * j + 1];
            }
    }

    /// <summary>w . x with <paramref name="xp"/> in the paired layout (<paramref name="n"/> a multiple of <see cref="PairBlock"/>).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static float DotPaired(ushort* w, float* xp, int n, ushort* ahead)
    {
        int i = 0;
        if (Vector512.IsHardwareAccelerated && Avx512F.IsSupported)
        {
            var mask = Vector512.Create(0xFFFF0000u);
            Vector512<float> s0 = default, s1 = default, s2 = default, s3 = default;
            for (; i + 64 <= n; i += 64)
            {
                Sse.Prefetch0(ahead + i);
                Sse.Prefetch0(ahead + i + 32);
                var a = Vector512.Load((uint*)(w + i));
                var b = Vector512.Load((uint*)(w + i + 32));
                s0 = Avx512F.FusedMultiplyAdd(Vector512.ShiftLeft(a, 16).AsSingle(), Vector512.Load(xp + i), s0);
                s1 = Avx512F.FusedMultiplyAdd((a & mask).AsSingle(), Vector512.Load(xp + i + 16), s1);
                s2 = Avx512F.FusedMultiplyAdd(Vector512.ShiftLeft(b, 16).AsSingle(), Vector512.Load(xp + i + 32), s2);
                s3 = Avx512F.FusedMultiplyAdd((b & mask).AsSingle(), Vector512.Load(xp + i + 48), s3);
            }
            for (; i < n; i += 32)
            {
                var a = Vector512.Load((uint*)(w + i));
                s0 = Avx512F.FusedMultiplyAdd(Vector512.ShiftLeft(a, 16).AsSingle(), Vector512.Load(xp + i), s0);
                s1 = Avx512F.FusedMultiplyAdd((a & mask).AsSingle(), Vector512.Load(xp + i + 16), s1);
            }
            return Vector512.Sum((s0 + s1) + (s2 + s3));
        }
        var mask256 = Vector256.Create(0xFFFF0000u);
        Vector256<float> t0 = default, t1 = default, t2 = default, t3 = default;
        for (; i + 32 <= n; i += 32)
        {
            var a = Vector256.Load((uint*)(w + i));
            var b = Vector256.Load((uint*)(w + i + 16));
            t0 = Simd.Fma(Vector256.ShiftLeft(a, 16).AsSingle(), Vector256.Load(xp + i), t0);
            t1 = Simd.Fma((a & mask256).AsSingle(), Vector256.Load(xp + i + 8), t1);
            t2 = Simd.Fma(Vector256.ShiftLeft(b, 16).AsSingle(), Vector256.Load(xp + i + 16), t2);
            t3 = Simd.Fma((b & mask256).AsSingle(), Vector256.Load(xp + i + 24), t3);
        }
        for (; i < n; i += 16)
        {
            var a = Vector256.Load((uint*)(w + i));
            t0 = Simd.Fma(Vector256.ShiftLeft(a, 16).AsSingle(), Vector256.Load(xp + i), t0);
            t1 = Simd.Fma((a & mask256).AsSingle(), Vector256.Load(xp + i + 8), t1);
        }
        return Vector256.Sum((t0 + t1) + (t2 + t3));
    }

    /// <summary><see cref="DotPaired"/> for two input rows, reading <paramref name="w"/> once.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Dot2Paired(ushort* w, float* xp0, float* xp1, int n, float* y0, float* y1)
    {
        int i = 0;
        if (Vector512.IsHardwareAccelerated && Avx512F.IsSupported)
        {
            var mask = Vector512.Create(0xFFFF0000u);
            Vector512<float> a0 = default, a1 = default, b0 = default, b1 = default;
            for (; i < n; i += 32)
            {
                var v = Vector512.Load((uint*)(w + i));
                var lo = Vector512.ShiftLeft(v, 16).AsSingle();
                var hi = (v & mask).AsSingle();
                a0 = Avx512F.FusedMultiplyAdd(lo, Vector512.Load(xp0 + i), a0);
                a1 = Avx512F.FusedMultiplyAdd(hi, Vector512.Load(xp0 + i + 16), a1);
                b0 = Avx512F.FusedMultiplyAdd(lo, Vector512.Load(xp1 + i), b0);
                b1 = Avx512F.FusedMultiplyAdd(hi, Vector512.Load(xp1 + i + 16), b1);
            }
            *y0 = Vector512.Sum(a0 + a1);
            *y1 = Vector512.Sum(b0 + b1);
            return;
        }
        var mask256 = Vector256.Create(0xFFFF0000u);
        Vector256<float> c0 = default, c1 = default, d0 = default, d1 = default;
        for (; i < n; i += 16)
        {
            var v = Vector256.Load((uint*)(w + i));
            var lo = Vector256.ShiftLeft(v, 16).AsSingle();
            var hi = (v & mask256).AsSingle();
            c0 = Simd.Fma(lo, Vector256.Load(xp0 + i), c0);
            c1 = Simd.Fma(hi, Vector256.Load(xp0 + i + 8), c1);
            d0 = Simd.Fma(lo, Vector256.Load(xp1 + i), d0);
            d1 = Simd.Fma(hi, Vector256.Load(xp1 + i + 8), d1);
        }
        *y0 = Vector256.Sum(c0 + c1);
        *y1 = Vector256.Sum(d0 + d1);
    }
}
