using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Kernels.Cpu;

/// <summary>
/// int8 weights in llama.cpp's Q8_0 layout: each row split into groups of <see cref="Group"/> weights, each group one
/// scale <c>d = max|w| / 127</c> (rounded to float16, as Q8_0 stores it) and 32 int8 values <c>round(w / d)</c> (half
/// away from zero, by the unrounded scale, as ggml's reference quantizer does), so a dequantized weight is exactly
/// Q8_0's <c>d * q</c>. The values and the scales are kept apart (an int8 [n, k] tensor and a float32 [n, k / 32]
/// one; float32 scales cost 1/16 byte per weight more than Q8_0's float16 ones and need no conversion in the loop).
/// The float32 kernels here dequantize a group into registers and multiply by float32 activations; on CPUs with
/// AVX-VNNI the engine quantizes the activations too and multiplies in integers (<see cref="Q8Gemm"/>).
/// </summary>
internal static unsafe class Q8
{
    /// <summary>Weights per scale.</summary>
    public const int Group = 32;

    /// <summary>Whether a matrix whose rows are <paramref name="k"/> long can be quantized (whole groups only).</summary>
    public static bool Fits(long k) => k % Group == 0;

    /// <summary>Quantizes <paramref name="w"/> [n, k] (float32, bfloat16 or float16; k a multiple of 32) through <see cref="QuantizeRaw"/>.</summary>
    public static (Tensor Values, Tensor Scales) Quantize(Tensor w)
    {
        long n = w.shape[0], k = w.shape[1];
        if (!Fits(k)) throw new ArgumentException($"Rows of {k} weights are not whole groups of {Group}.", nameof(w));
        using var source = w.contiguous();
        string dtype = source.dtype switch
        {
            ScalarType.Float32 => "F32",
            ScalarType.BFloat16 => "BF16",
            ScalarType.Float16 => "F16",
            var t => throw new NotSupportedException($"Cannot quantize a {t} tensor."),
        };
        var q = empty([n, k], ScalarType.Int8);
        var s = empty([n, k / Group], ScalarType.Float32);
        QuantizeRaw((byte*)Simd.Pointer(source), dtype, n, k, (sbyte*)Simd.Pointer(q), Simd.Pointer(s));
        return (q, s);
    }

    /// <summary>
    /// Quantizes <paramref name="rows"/> rows of <paramref name="k"/> weights stored at <paramref name="source"/> as a
    /// safetensors dtype (F32, BF16 or F16) into <paramref name="q"/> and <paramref name="scales"/>, a group at a time:
    /// no float32 copy of the matrix is ever made (quantizing a float32 checkpoint through temporaries left gigabytes
    /// of freed heap resident).
    /// </summary>
    public static void QuantizeRaw(byte* source, string dtype, long rows, long k, sbyte* q, float* scales)
    {
        if (!Fits(k)) throw new ArgumentException($"Rows of {k} weights are not whole groups of {Group}.", nameof(k));
        if (dtype is not ("F32" or "BF16" or "F16")) throw new NotSupportedException($"Cannot quantize weights stored as {dtype}.");
        long groups = rows * k / Group;
        int chunks = (int)Math.Min(groups, 64);
        CpuWorkers.Shared.For(chunks, c =>
        {
            float* x = stackalloc float[Group];
            for (long g = groups * c / chunks, end = groups * (c + 1) / chunks; g < end; g++)
            {
                long first = g * Group;
                switch (dtype)
                {
                    case "F32": new ReadOnlySpan<float>((float*)source + first, Group).CopyTo(new Span<float>(x, Group)); break;
                    case "BF16": Bf16.Widen((ushort*)source + first, x, Group); break;
                    default: for (int j = 0; j < Group; j++) x[j] = (float)((Half*)source)[first + j]; break;
                }
                QuantizeGroup(x, q + first, scales + g);
            }
        });
    }

    /// <summary>One group of 32 as Q8_0 defines it.</summary>
    public static void QuantizeGroup(float* x, sbyte* q, float* scale)
    {
        float amax = 0;
        for (int j = 0; j < Group; j++) amax = Math.Max(amax, Math.Abs(x[j]));
        float d = amax / 127f, id = d != 0 ? 1f / d : 0f;
        for (int j = 0; j < Group; j++) q[j] = (sbyte)MathF.Round(x[j] * id, MidpointRounding.AwayFromZero);
        *scale = (float)(Half)d;
    }

    /// <summary>dst = d * q for <paramref name="count"/> weights (whole groups).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Dequantize(sbyte* q, float* scales, float* dst, long count)
    {
        for (long g = 0; g < count / Group; g++)
        {
            sbyte* src = q + g * Group;
            float* o = dst + g * Group;
            var d = Vector256.Create(scales[g]);
            for (int j = 0; j < Group; j += 8)
                (Vector256.ConvertToSingle(Widen8(src + j)) * d).Store(o + j);
        }
    }

    /// <summary>Eight int8 at <paramref name="p"/> as int32.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<int> Widen8(sbyte* p)
    {
        if (Avx2.IsSupported) return Avx2.ConvertToVector256Int32(p);
        var (lo, _) = Vector128.Widen(Vector128.CreateScalar(*(long*)p).AsSByte());
        var (a, b) = Vector128.Widen(lo);
        return Vector256.Create(a, b);
    }

    /// <summary>Sixteen int8 at <paramref name="p"/> as float32 (AVX-512 only).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Load16Wide(sbyte* p) =>
        Avx512F.ConvertToVector512Single(Avx512F.ConvertToVector512Int32(Vector128.Load(p)));

    /// <summary>The dot product of quantized row (<paramref name="q"/>, <paramref name="scales"/>) with float32 <paramref name="x"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static float Dot(sbyte* q, float* scales, float* x, int k, sbyte* ahead)
    {
        int groups = k / Group;
        if (Vector512.IsHardwareAccelerated && Avx512F.IsSupported)
        {
            Vector512<float> acc0 = default, acc1 = default;
            int g = 0;
            for (; g + 2 <= groups; g += 2)
            {
                int i = g * Group;
                Sse.Prefetch0(ahead + i);
                var b0 = Load16Wide(q + i) * Vector512.Load(x + i);
                b0 = Avx512F.FusedMultiplyAdd(Load16Wide(q + i + 16), Vector512.Load(x + i + 16), b0);
                var b1 = Load16Wide(q + i + 32) * Vector512.Load(x + i + 32);
                b1 = Avx512F.FusedMultiplyAdd(Load16Wide(q + i + 48), Vector512.Load(x + i + 48), b1);
                acc0 = Avx512F.FusedMultiplyAdd(b0, Vector512.Create(scales[g]), acc0);
                acc1 = Avx512F.FusedMultiplyAdd(b1, Vector512.Create(scales[g + 1]), acc1);
            }
            for (; g < groups; g++)
            {
                int i = g * Group;
                var b0 = Load16Wide(q + i) * Vector512.Load(x + i);
                b0 = Avx512F.FusedMultiplyAdd(Load16Wide(q + i + 16), Vector512.Load(x + i + 16), b0);
                acc0 = Avx512F.FusedMultiplyAdd(b0, Vector512.Create(scales[g]), acc0);
            }
            return Vector512.Sum(acc0 + acc1);
        }
        var acc = Vector256<float>.Zero;
        for (int g = 0; g < groups; g++)
        {
            int i = g * Group;
            var b = Vector256.ConvertToSingle(Widen8(q + i)) * Vector256.Load(x + i);
            b = Simd.Fma(Vector256.ConvertToSingle(Widen8(q + i + 8)), Vector256.Load(x + i + 8), b);
            b = Simd.Fma(Vector256.ConvertToSingle(Widen8(q + i + 16)), Vector256.Load(x + i + 16), b);
            b = Simd.Fma(Vector256.ConvertToSingle(Widen8(q + i + 24)), Vector256.Load(x + i + 24), b);
            acc = Simd.Fma(b, Vector256.Create(scales[g]), acc);
        }
        return Vector256.Sum(acc);
    }

    /// <summary><see cref="Dot"/> for two input rows, reading the weights once.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Dot2(sbyte* q, float* scales, float* x0, float* x1, int k, float* y0, float* y1, sbyte* ahead)
    {
        int groups = k / Group;
        if (Vector512.IsHardwareAccelerated && Avx512F.IsSupported)
        {
            Vector512<float> a = default, b = default;
            for (int g = 0; g < groups; g++)
            {
                int i = g * Group;
                Sse.Prefetch0(ahead + i);
                var lo = Load16Wide(q + i);
                var hi = Load16Wide(q + i + 16);
                var s = Vector512.Create(scales[g]);
                a = Avx512F.FusedMultiplyAdd(Avx512F.FusedMultiplyAdd(hi, Vector512.Load(x0 + i + 16), lo * Vector512.Load(x0 + i)), s, a);
                b = Avx512F.FusedMultiplyAdd(Avx512F.FusedMultiplyAdd(hi, Vector512.Load(x1 + i + 16), lo * Vector512.Load(x1 + i)), s, b);
            }
            *y0 = Vector512.Sum(a);
            *y1 = Vector512.Sum(b);
            return;
        }
        *y0 = Dot(q, scales, x0, k, ahead);
        *y1 = Dot(q, scales, x1, k, ahead);
    }
}
