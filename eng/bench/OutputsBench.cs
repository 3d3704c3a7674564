using System.Diagnostics;
using System.Text.Json;
using LocalVllm.Engine;
using LocalVllm.Engine.Kernels.Cpu;

namespace LocalVllm.Bench;

/// <summary>
/// Output processing over a long generation: a tiny random model with a byte-level tokenizer (so the forward pass is
/// cheap and detokenizing, stop checks and building outputs are what a step costs beyond it) generates
/// <c>--tokens</c> tokens for a few requests at once; the engine's output-processing time per step (the scheduler
/// applying the step's tokens, detokenizing, stop checks, building outputs) is compared early in the generation (steps
/// 100-199) and at its end (the hundred steps before the last). Flat means that a step's output work does not grow with
/// the text so far.
/// </summary>
internal static class OutputsBench
{
    public sealed record Settings(int Tokens, int Requests, string Kind, string? Json);

    public sealed record Window(int FromStep, int ToStep, double OutputMsPerStep, double OutputMedianMs, double StepMsPerStep);

    public static int Run(Settings s)
    {
        TorchRuntime.Configure();
        var dir = BenchModels.OutputsModel();
        using var llm = new Llm(new EngineOptions { Model = dir, KvCacheMemoryBytes = 256L << 20 });
        var engine = llm.Engine;
        var kind = s.Kind switch
        {
            "cumulative" => RequestOutputKind.Cumulative,
            "delta" => RequestOutputKind.Delta,
            "final" => RequestOutputKind.FinalOnly,
            _ => throw new ArgumentException($"Unknown --output-kind '{s.Kind}': use cumulative, delta or final."),
        };
        var sampling = new SamplingParams { Temperature = 20, Seed = 7, MaxTokens = s.Tokens, IgnoreEos = true, Stop = ["<|never|>"], OutputKind = kind };
        var prompt = engine.EncodePrompt("Once upon a time, in a bakery far away, ");
        // Warm-up: the same requests with fewer tokens, so that every path runs fully optimised before timing (tiered
        // compilation with dynamic PGO took about 2,000 steps to settle here: without it, early steps measure the JIT).
        for (int r = 0; r < s.Requests; r++) engine.AddRequest(prompt, sampling with { Seed = 100 + r, MaxTokens = 3000 });
        while (engine.HasUnfinishedRequests) engine.Step();
        for (int r = 0; r < s.Requests; r++) engine.AddRequest(prompt, sampling with { Seed = 7 + r });
        var output = new List<double>();
        var total = new List<double>();
        long outputTicks = engine.Counters.OutputTicks;
        while (engine.HasUnfinishedRequests)
        {
            long t0 = Stopwatch.GetTimestamp();
            engine.Step();
            total.Add(Stopwatch.GetElapsedTime(t0).TotalMilliseconds);
            output.Add((engine.Counters.OutputTicks - outputTicks) * 1000.0 / Stopwatch.Frequency);
            outputTicks = engine.Counters.OutputTicks;
        }
        Window At(int from, int to)
        {
            var o = output.Skip(from).Take(to - from).ToArray();
            var sorted = o.Order().ToArray();
            return new(from, to, o.Average(), sorted[sorted.Length / 2], total.Skip(from).Take(to - from).Average());
        }
        int n = output.Count;
        // Early steps against the last hundred before the final one (the final step finishes the requests: freeing
        // blocks and building final outputs is once per request, not per step).
        var early = At(100, 200);
        var late = At(n - 101, n - 1);
        Console.WriteLine($"model {dir}: {s.Requests} requests x {s.Tokens} tokens, output kind {s.Kind}, {n} steps");
        Console.WriteLine("| steps | output processing ms/step (mean) | (median) | whole step ms/step |");
        Console.WriteLine("|---|---|---|---|");
        foreach (var w in new[] { early, late })
            Console.WriteLine($"| {w.FromStep}-{w.ToStep} | {w.OutputMsPerStep:F4} | {w.OutputMedianMs:F4} | {w.StepMsPerStep:F3} |");
        if (Environment.GetEnvironmentVariable("OUTPUTS_BENCH_CURVE") == "1")
            for (int w = 0; w + 200 <= n; w += 200) Console.WriteLine($"  steps {w}-{w + 200}: median {At(w, w + 200).OutputMedianMs * 1000:F1} us, mean {At(w, w + 200).OutputMsPerStep * 1000:F1} us");
        Console.WriteLine($"late / early output processing per step: mean {late.OutputMsPerStep / early.OutputMsPerStep:F2}x, median {late.OutputMedianMs / early.OutputMedianMs:F2}x");
        if (s.Json is not null)
            File.WriteAllText(s.Json, JsonSerializer.Serialize(new { settings = s, early, late, ratioMean = late.OutputMsPerStep / early.OutputMsPerStep, ratioMedian = late.OutputMedianMs / early.OutputMedianMs },
                new JsonSerializerOptions { WriteIndented = true }));
        return 0;
    }
}
