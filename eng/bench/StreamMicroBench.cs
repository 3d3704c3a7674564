using System.Diagnostics;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using LocalVllm.Engine;
using LocalVllm.Engine.Kernels.Cpu;
using static TorchSharp.torch;

namespace LocalVllm.Bench;

/// <summary>
/// The memory floor of a decode step: how fast this machine streams 1.8 GB of weights (28 Qwen3-0.6B layers) with
/// every core summing a share, after <c>HugePages.Advise</c> (as the engine's weights): front to back, and as the
/// linear kernels read a weight (eight rows of 1,024 at a time, side by side).
/// </summary>
internal static unsafe class StreamMicroBench
{
    public static void Run()
    {
        const long floats = 440L << 20; // ~1.8 GB
        using var t = randn(floats);
        HugePages.Advise(t);
        float* p = (float*)Unsafe.AsPointer(ref System.Runtime.InteropServices.MemoryMarshal.GetReference(t.bytes));
        const int chunks = 64;
        foreach (int rows in new[] { 1, 3, 8, 1, 3, 8 })
        {
            double Pass()
            {
                var sw = Stopwatch.StartNew();
                Parallel.For(0, chunks, new ParallelOptions { MaxDegreeOfParallelism = Environment.ProcessorCount }, c => Sum(p + floats * c / chunks, floats / chunks, rows));
                return sw.Elapsed.TotalMilliseconds;
            }
            Pass();
            double best = double.MaxValue, total = 0;
            for (int i = 0; i < 5; i++) { double ms = Pass(); total += ms; best = Math.Min(best, ms); }
            Console.WriteLine($"stream read of {floats * 4 / 1e9:F2} GB, {rows} rows of 1,024 side by side: mean {floats * 4 / (total / 5) / 1e6:F1} GB/s, best {floats * 4 / best / 1e6:F1} GB/s");
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static float Sum(float* p, long n, int rows)
    {
        Vector512<float> a = default, b = default;
        long tile = rows * 1024L;
        for (long t = 0; t + tile <= n; t += tile)
            for (long i = 0; i < 1024; i += 32)
                for (int r = 0; r < rows; r++)
                {
                    a += Vector512.Load(p + t + r * 1024 + i);
                    b += Vector512.Load(p + t + r * 1024 + i + 16);
                }
        return Vector512.Sum(a + b);
    }
}
