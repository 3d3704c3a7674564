using System.Diagnostics;
using LocalVllm.Engine.Kernels.Cpu;
using TorchSharp;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LocalVllm.Bench;

/// <summary>
/// Micro-benchmark of the linear layers of a Qwen3-0.6B decode step: 28 layers of distinct random weights (qkv, o,
/// gate/up, down: 1.8 GB, so every weight comes from memory as in the engine) plus the LM head, run for 1-64 rows
/// with libtorch's linear and with each SmallBatchLinear kernel; and decode attention alone (AttentionMicroBench).
/// </summary>
internal static class MicroBench
{
    public static int[] RowCounts = { 1, 4, 8, 16, 32, 48, 64, 256, 1024 };

    public static int Run(int threads, string part)
    {
        TorchRuntime.Configure();
        torch.set_num_threads(threads);
        if (part is "all" or "attention") AttentionMicroBench.Run(threads);
        if (part is "all" or "sampler") ArgMaxMicroBench.Run();
        if (part is "all" or "stream") StreamMicroBench.Run();
        if (part is "all" or "peak") PeakMicroBench.Run();
        if (part == "small") RowCounts = new[] { 1, 2, 3, 4, 6, 8, 10, 12, 16 };
        if (part == "single") { RowCounts = new[] { 1 }; part = "small"; }
        if (part == "prefill") RowCounts = [];
        if (part == "mid") RowCounts = new[] { 16, 32, 64, 256 };
        if (part == "formats") return Formats();
        if (part == "int8") return Int8Kernels();
        if (part is not ("all" or "linear" or "small" or "mid" or "prefill")) return 0;
        const int layers = 28, hidden = 1024;
        var shapes = new (int Out, int In)[] { (4096, hidden), (hidden, 2048), (6144, hidden), (hidden, 3072) };
        var weights = Enumerable.Range(0, layers).Select(_ => shapes.Select(s => randn(s.Out, s.In) / 32).ToArray()).ToArray();
        using var lmHead = randn(151936, hidden) / 32;
        // As the engine does with its weights (CausalLm).
        foreach (var layer in weights) foreach (var w in layer) HugePages.Advise(w);
        HugePages.Advise(lmHead);
        double layerFlopsPerRow = 2.0 * layers * shapes.Sum(s => (double)s.Out * s.In);
        double headFlopsPerRow = 2.0 * 151936 * hidden;
        Console.WriteLine("| rows | kernel | 28 layers ms | GFLOP/s | LM head ms | GFLOP/s |");
        Console.WriteLine("|---|---|---|---|---|---|");
        foreach (var m in RowCounts)
        {
            var inputs = shapes.Select(s => randn(m, s.In)).ToArray();
            using var headInput = randn(m, hidden);
            var kernels = new List<(string Name, Func<Tensor, Tensor, Tensor> Linear)> { ("libtorch linear", (x, w) => F.linear(x, w)) };
            if ((m <= 64 && part != "small") || m <= SmallBatchLinear.DotRowsMax) kernels.Add(("SmallBatchLinear dot", (x, w) => SmallBatchLinear.Apply(x, w, null, SmallBatchLinear.Kernel.Dot)));
            if (SmallBatchLinear.BroadcastSupported)
                kernels.Add(("SmallBatchLinear broadcast", (x, w) => SmallBatchLinear.Apply(x, w, null, SmallBatchLinear.Kernel.Broadcast)));
            foreach (var (name, linear) in kernels)
            {
                double Time(Action a, int reps)
                {
                    a();
                    var sw = Stopwatch.StartNew();
                    for (int i = 0; i < reps; i++) a();
                    return sw.Elapsed.TotalMilliseconds / reps;
                }
                double layerMs = Time(() =>
                {
                    foreach (var layer in weights)
                        for (int j = 0; j < shapes.Length; j++) linear(inputs[j], layer[j]).Dispose();
                }, m > 64 ? 1 : 3);
                double headMs = Time(() => linear(headInput, lmHead).Dispose(), m > 64 ? 1 : 3);
                Console.WriteLine($"| {m} | {name} | {layerMs:F1} | {layerFlopsPerRow * m / layerMs / 1e6:F1} | {headMs:F1} | {headFlopsPerRow * m / headMs / 1e6:F1} |");
            }
            foreach (var t in inputs) t.Dispose();
        }
        if (part is "small" or "mid") return 0;
        // Long prefill chunks (MaxNumBatchedTokens 8192): one layer's four products.
        foreach (var m in new[] { 512, 2048, 8192 })
        {
            var inputs = shapes.Select(s => randn(m, s.In)).ToArray();
            foreach (var (name, kernel) in new (string, SmallBatchLinear.Kernel?)[] { ("libtorch linear", null), ("SmallBatchLinear broadcast", SmallBatchLinear.Kernel.Broadcast) })
            {
                if (kernel is not null && !SmallBatchLinear.BroadcastSupported) continue;
                void Once()
                {
                    for (int j = 0; j < shapes.Length; j++)
                        (kernel is null ? F.linear(inputs[j], weights[0][j]) : SmallBatchLinear.Apply(inputs[j], weights[0][j], null, kernel.Value)).Dispose();
                }
                Once();
                var sw = Stopwatch.StartNew();
                Once();
                double ms = sw.Elapsed.TotalMilliseconds;
                Console.WriteLine($"| {m} (one layer) | {name} | {ms:F1} | {layerFlopsPerRow / layers * m / ms / 1e6:F1} | | |");
            }
            foreach (var t in inputs) t.Dispose();
        }
        foreach (var layer in weights) foreach (var w in layer) w.Dispose();
        return 0;
    }

    /// <summary>
    /// int8 weights of one Qwen3-0.6B layer (its four products, weights in cache after the first pass) through the float32
    /// broadcast kernel (dequantized tiles, float32 activations) and the integer kernel (int8 activations, AVX-VNNI).
    /// </summary>
    private static int Int8Kernels()
    {
        if (!SmallBatchLinear.BroadcastSupported || !Q8Gemm.Supported) { Console.WriteLine("needs AVX-512 and AVX-VNNI"); return 0; }
        var shapes = new (int Out, int In)[] { (4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072) };
        var q8 = shapes.Select(sh => { using var w = randn(sh.Out, sh.In) / 32; return Q8.Quantize(w); }).ToArray();
        double flopsPerRow = 2.0 * shapes.Sum(sh => (double)sh.Out * sh.In);
        Console.WriteLine("| rows | broadcast (float32 activations) ms | GFLOP/s | integer (int8 activations) ms | GFLOP/s |");
        Console.WriteLine("|---|---|---|---|---|");
        foreach (int m in new[] { 8, 16, 32, 64, 256, 1024 })
        {
            var inputs = shapes.Select(sh => randn(m, sh.In)).ToArray();
            double Time(SmallBatchLinear.Kernel kernel)
            {
                void Once() { for (int j = 0; j < shapes.Length; j++) SmallBatchLinear.Apply(inputs[j], q8[j].Values, null, kernel, q8[j].Scales).Dispose(); }
                Once();
                int reps = m >= 256 ? 3 : 20;
                var sw = Stopwatch.StartNew();
                for (int i = 0; i < reps; i++) Once();
                return sw.Elapsed.TotalMilliseconds / reps;
            }
            double a = Time(SmallBatchLinear.Kernel.Broadcast), b = Time(SmallBatchLinear.Kernel.Integer);
            Console.WriteLine($"| {m} | {a:F2} | {flopsPerRow * m / a / 1e6:F1} | {b:F2} | {flopsPerRow * m / b / 1e6:F1} |");
            foreach (var t in inputs) t.Dispose();
        }
        foreach (var (values, scales) in q8)
        {
            values.Dispose();
            scales.Dispose();
        }
        return 0;
    }

    /// <summary>
    /// The 28 layers' products through the engine's automatic kernel choice with the weights in each storage format
    /// (float32, bfloat16, int8 with its scales), for the row counts of single-stream and batched decode steps.
    /// </summary>
    private static int Formats()
    {
        const int layers = 28, hidden = 1024;
        var shapes = new (int Out, int In)[] { (4096, hidden), (hidden, 2048), (6144, hidden), (hidden, 3072) };
        var f32 = Enumerable.Range(0, layers).Select(_ => shapes.Select(s => randn(s.Out, s.In) / 32).ToArray()).ToArray();
        var bf16 = f32.Select(l => l.Select(w => w.to(ScalarType.BFloat16)).ToArray()).ToArray();
        var q8 = f32.Select(l => l.Select(Q8.Quantize).ToArray()).ToArray();
        var panels = Bf16Panels.Supported ? bf16.Select(l => l.Select(Bf16Panels.Pack).ToArray()).ToArray() : null;
        foreach (var layer in f32) foreach (var w in layer) HugePages.Advise(w);
        double flopsPerRow = 2.0 * layers * shapes.Sum(s => (double)s.Out * s.In);
        Console.WriteLine("| rows | float32 ms | bfloat16 row-major ms (dot kernel) | bfloat16 panels ms | int8 ms (dot kernel) | int8 GFLOP/s |");
        Console.WriteLine("|---|---|---|---|---|---|");
        foreach (int m in new[] { 1, 2, 3, 4, 5, 8, 12, 16, 32, 64, 256 })
        {
            var inputs = shapes.Select(s => randn(m, s.In)).ToArray();
            double Time(Func<int, int, Tensor> linear)
            {
                void Once()
                {
                    for (int l = 0; l < layers; l++)
                        for (int j = 0; j < shapes.Length; j++) linear(l, j).Dispose();
                }
                Once();
                var sw = Stopwatch.StartNew();
                for (int i = 0; i < 3; i++) Once();
                return sw.Elapsed.TotalMilliseconds / 3;
            }
            double a = Time((l, j) => SmallBatchLinear.Apply(inputs[j], f32[l][j], null));
            double b = Time((l, j) => SmallBatchLinear.Apply(inputs[j], bf16[l][j], null));
            double p = panels is null ? double.NaN : Time((l, j) => Bf16Panels.Apply(inputs[j], panels[l][j]));
            double c = Time((l, j) => SmallBatchLinear.Apply(inputs[j], q8[l][j].Values, null, scales: q8[l][j].Scales));
            var dot = SmallBatchLinear.Kernel.Dot;
            double bd = m > 16 ? double.NaN : Time((l, j) => SmallBatchLinear.Apply(inputs[j], bf16[l][j], null, dot));
            double cd = m > 16 ? double.NaN : Time((l, j) => SmallBatchLinear.Apply(inputs[j], q8[l][j].Values, null, dot, q8[l][j].Scales));
            Console.WriteLine($"| {m} | {a:F1} | {b:F1} ({bd:F1}) | {p:F1} | {c:F1} ({cd:F1}) | {flopsPerRow * m / c / 1e6:F1} |");
            foreach (var t in inputs) t.Dispose();
        }
        return 0;
    }
}
