using System.Diagnostics;
using TorchSharp;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LocalVllm.Bench;

/// <summary>Micro-benchmarks of the linear-layer shapes a Qwen3-0.6B step runs: libtorch's linear in two weight layouts and our SmallBatchLinear.</summary>
internal static class MicroBench
{
    public static int Run(int threads)
    {
        torch.set_num_threads(threads);
        foreach (var (n, k) in new[] { (4096, 1024), (6144, 1024), (1024, 3072), (151936, 1024) })
            foreach (var m in new[] { 1, 4, 16, 32, 64 })
            {
                using var w = randn(n, k) / 32; // [out, in] as checkpoints store it
                using var wt = w.t().contiguous(); // [in, out]
                using var x = randn(m, k);
                double Time(Func<Tensor> f)
                {
                    for (int i = 0; i < 3; i++) f().Dispose();
                    var sw = Stopwatch.StartNew();
                    int reps = n > 100000 ? 5 : 30;
                    for (int i = 0; i < reps; i++) f().Dispose();
                    return sw.Elapsed.TotalMilliseconds / reps;
                }
                double linear = Time(() => F.linear(x, w));
                double matmulT = Time(() => x.matmul(wt));
                double streaming = m <= LocalVllm.Engine.Models.SmallBatchLinear.MaxRows ? Time(() => LocalVllm.Engine.Models.SmallBatchLinear.Apply(x, w, null)) : double.NaN;
                double gb = (double)n * k * 4 / 1e9;
                Console.WriteLine($"[{m},{k}]x[{k},{n}]: linear(w[out,in]) {linear:F2} ms ({gb / (linear / 1000):F1} GB/s), matmul(w[in,out]) {matmulT:F2} ms, SmallBatchLinear {streaming:F2} ms ({linear / streaming:F2}x vs linear)");
            }
        return 0;
    }
}
