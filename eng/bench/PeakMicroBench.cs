using System.Diagnostics;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace LocalVllm.Bench;

/// <summary>
/// The machine's float32 multiply-add peak: twelve independent 512-bit FMA chains in registers (no memory), on one
/// thread and on every core. The GEMM ceiling that `compare` reports (libtorch's [1024,1024]x[1024,3072]) is a
/// fraction of this. Also the integer dot-product peaks that .NET exposes on this CPU (AVX-VNNI, 256-bit): int8
/// (<c>vpdpbusd</c>, 32 multiply-adds per instruction) and int16 (<c>vpdpwssd</c>, 16), counted as multiply-adds
/// per second beside the FMA's (16 per 512-bit FMA), to size a quantized-activation kernel before writing one.
/// </summary>
internal static class PeakMicroBench
{
    public static void Run()
    {
        if (!Avx512F.IsSupported)
        {
            Console.WriteLine("FMA peak: needs AVX-512 (not measured)");
            return;
        }
        const long iterations = 100_000_000;
        Chains(1000, 1f);
        foreach (int threads in new[] { 1, Environment.ProcessorCount })
        {
            double best = 0;
            for (int round = 0; round < 3; round++)
            {
                var sw = Stopwatch.StartNew();
                Parallel.For(0, threads, new ParallelOptions { MaxDegreeOfParallelism = threads }, _ => Chains(iterations, 1f));
                best = Math.Max(best, threads * iterations * 12 * 32 / sw.Elapsed.TotalSeconds / 1e9);
            }
            Console.WriteLine($"FMA peak, {threads} thread(s): {best:F1} GFLOP/s = {best / 2:F1} G multiply-adds/s");
        }
        if (!AvxVnni.IsSupported)
        {
            Console.WriteLine("AVX-VNNI: not supported (integer dot-product peaks not measured)");
            return;
        }
        Int8Chains(1000);
        Int16Chains(1000);
        foreach (int threads in new[] { 1, Environment.ProcessorCount })
        {
            double best8 = 0, best16 = 0;
            for (int round = 0; round < 3; round++)
            {
                var sw = Stopwatch.StartNew();
                Parallel.For(0, threads, new ParallelOptions { MaxDegreeOfParallelism = threads }, _ => Int8Chains(iterations));
                best8 = Math.Max(best8, threads * iterations * 12 * 32 / sw.Elapsed.TotalSeconds / 1e9);
                sw.Restart();
                Parallel.For(0, threads, new ParallelOptions { MaxDegreeOfParallelism = threads }, _ => Int16Chains(iterations));
                best16 = Math.Max(best16, threads * iterations * 12 * 16 / sw.Elapsed.TotalSeconds / 1e9);
            }
            Console.WriteLine($"AVX-VNNI peak, {threads} thread(s): int8 (vpdpbusd ymm) {best8:F1} G multiply-adds/s, int16 (vpdpwssd ymm) {best16:F1} G multiply-adds/s");
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization | MethodImplOptions.NoInlining)]
    private static int Int8Chains(long iterations)
    {
        var u = Vector256.Create((byte)3);
        var s = Vector256.Create((sbyte)-1);
        Vector256<int> a0 = default, a1 = default, a2 = default, a3 = default, a4 = default, a5 = default,
            a6 = default, a7 = default, a8 = default, a9 = default, a10 = default, a11 = default;
        for (long i = 0; i < iterations; i++)
        {
            a0 = AvxVnni.MultiplyWideningAndAdd(a0, u, s); a1 = AvxVnni.MultiplyWideningAndAdd(a1, u, s); a2 = AvxVnni.MultiplyWideningAndAdd(a2, u, s);
            a3 = AvxVnni.MultiplyWideningAndAdd(a3, u, s); a4 = AvxVnni.MultiplyWideningAndAdd(a4, u, s); a5 = AvxVnni.MultiplyWideningAndAdd(a5, u, s);
            a6 = AvxVnni.MultiplyWideningAndAdd(a6, u, s); a7 = AvxVnni.MultiplyWideningAndAdd(a7, u, s); a8 = AvxVnni.MultiplyWideningAndAdd(a8, u, s);
            a9 = AvxVnni.MultiplyWideningAndAdd(a9, u, s); a10 = AvxVnni.MultiplyWideningAndAdd(a10, u, s); a11 = AvxVnni.MultiplyWideningAndAdd(a11, u, s);
        }
        return Vector256.Sum(a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11);
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization | MethodImplOptions.NoInlining)]
    private static int Int16Chains(long iterations)
    {
        var x = Vector256.Create((short)3);
        var y = Vector256.Create((short)-1);
        Vector256<int> a0 = default, a1 = default, a2 = default, a3 = default, a4 = default, a5 = default,
            a6 = default, a7 = default, a8 = default, a9 = default, a10 = default, a11 = default;
        for (long i = 0; i < iterations; i++)
        {
            a0 = AvxVnni.MultiplyWideningAndAdd(a0, x, y); a1 = AvxVnni.MultiplyWideningAndAdd(a1, x, y); a2 = AvxVnni.MultiplyWideningAndAdd(a2, x, y);
            a3 = AvxVnni.MultiplyWideningAndAdd(a3, x, y); a4 = AvxVnni.MultiplyWideningAndAdd(a4, x, y); a5 = AvxVnni.MultiplyWideningAndAdd(a5, x, y);
            a6 = AvxVnni.MultiplyWideningAndAdd(a6, x, y); a7 = AvxVnni.MultiplyWideningAndAdd(a7, x, y); a8 = AvxVnni.MultiplyWideningAndAdd(a8, x, y);
            a9 = AvxVnni.MultiplyWideningAndAdd(a9, x, y); a10 = AvxVnni.MultiplyWideningAndAdd(a10, x, y); a11 = AvxVnni.MultiplyWideningAndAdd(a11, x, y);
        }
        return Vector256.Sum(a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11);
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization | MethodImplOptions.NoInlining)]
    private static float Chains(long iterations, float seed)
    {
        var m = Vector512.Create(0.9999999f);
        var c = Vector512.Create(seed);
        Vector512<float> a0 = c, a1 = c, a2 = c, a3 = c, a4 = c, a5 = c, a6 = c, a7 = c, a8 = c, a9 = c, a10 = c, a11 = c;
        for (long i = 0; i < iterations; i++)
        {
            a0 = Avx512F.FusedMultiplyAdd(a0, m, c); a1 = Avx512F.FusedMultiplyAdd(a1, m, c); a2 = Avx512F.FusedMultiplyAdd(a2, m, c);
            a3 = Avx512F.FusedMultiplyAdd(a3, m, c); a4 = Avx512F.FusedMultiplyAdd(a4, m, c); a5 = Avx512F.FusedMultiplyAdd(a5, m, c);
            a6 = Avx512F.FusedMultiplyAdd(a6, m, c); a7 = Avx512F.FusedMultiplyAdd(a7, m, c); a8 = Avx512F.FusedMultiplyAdd(a8, m, c);
            a9 = Avx512F.FusedMultiplyAdd(a9, m, c); a10 = Avx512F.FusedMultiplyAdd(a10, m, c); a11 = Avx512F.FusedMultiplyAdd(a11, m, c);
        }
        return Vector512.Sum(a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11);
    }
}
