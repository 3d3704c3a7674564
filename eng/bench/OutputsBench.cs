using System.Diagnostics;
using System.Text.Json;
using LocalVllm.Engine;
using LocalVllm.Engine.Kernels.Cpu;

namespace LocalVllm.Bench;

/// <summary>
/// Output processing over a long generation: a tiny random model with a byte-level tokenizer (so the forward pass is
/// cheap and detokenizing, stop checks and building outputs are what a step costs beyond it) generates
/// <c>--tokens</c> tokens for a few requests at once; the engine's output-processing time per step is compared early
/// in the generation and at its end. Flat means that a step's output work does not grow with the text so far.
/// </summary>
internal static class OutputsBench
{
    public sealed record Settings(int Tokens, int Requests, string Kind, string? Json);

    public sealed record Window(int FromStep, int ToStep, double OutputMsPerStep, double StepMsPerStep);

    public static int Run(Settings s)
    {
        TorchRuntime.Configure();
        var dir = BenchModels.OutputsModel();
        using var llm = new Llm(new EngineOptions { Model = dir, KvCacheMemoryBytes = 256L << 20 });
        var engine = llm.Engine;
        var sampling = new SamplingParams { Temperature = 1, Seed = 7, MaxTokens = s.Tokens, IgnoreEos = true, Stop = ["<|never|>"] };
        var prompt = engine.EncodePrompt("Once upon a time, in a bakery far away, ");
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
        Window At(int from, int to) => new(from, to, output.Skip(from).Take(to - from).Average(), total.Skip(from).Take(to - from).Average());
        int n = output.Count;
        var early = At(100, 200);
        var late = At(n - 100, n);
        Console.WriteLine($"model {dir}: {s.Requests} requests x {s.Tokens} tokens, output kind {s.Kind}, {n} steps");
        Console.WriteLine("| steps | output processing ms/step | whole step ms/step |");
        Console.WriteLine("|---|---|---|");
        foreach (var w in new[] { early, late })
            Console.WriteLine($"| {w.FromStep}-{w.ToStep} | {w.OutputMsPerStep:F4} | {w.StepMsPerStep:F3} |");
        Console.WriteLine($"late / early output processing per step: {late.OutputMsPerStep / early.OutputMsPerStep:F2}x");
        if (s.Json is not null)
            File.WriteAllText(s.Json, JsonSerializer.Serialize(new { settings = s, early, late, ratio = late.OutputMsPerStep / early.OutputMsPerStep },
                new JsonSerializerOptions { WriteIndented = true }));
        return 0;
    }
}
