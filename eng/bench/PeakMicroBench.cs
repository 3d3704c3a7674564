using System.Diagnostics;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace LocalVllm.Bench;

/// <summary>
/// The machine's float32 multiply-add peak: twelve independent 512-bit FMA chains in registers (no memory), on one
/// thread and on every core. The GEMM ceiling that `compare` reports (libtorch's [1024,1024]x[1024,3072]) is a
/// fraction of this.
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
            Console.WriteLine($"FMA peak, {threads} thread(s): {best:F1} GFLOP/s");
        }
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
