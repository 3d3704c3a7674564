using System.Diagnostics;
using System.Text.Json;
using LocalVllm.Engine;
using LocalVllm.Engine.Kernels.Cpu;

namespace LocalVllm.Bench;

/// <summary>
/// N sequences with seeded random prompt and output lengths, EOS ignored, greedy. Run batched through the engine and
/// then one request at a time with prefix caching off, in the same process, on the same weights.
/// </summary>
internal static class ThroughputBench
{
    public sealed record Settings(string Size, int NumSeqs, int MinInput, int MaxInput, int MinOutput, int MaxOutput, int Seed, int? Threads, string? Json);

    public sealed record RunResult(string Mode, double Seconds, long PromptTokens, long OutputTokens, double OutputTokensPerSecond, double TotalTokensPerSecond);

    public static int Run(Settings s)
    {
        TorchRuntime.Configure();
        var model = BenchModels.Resolve(s.Size);
        var rng = new Random(s.Seed);
        var options = new EngineOptions { Model = model, KvCacheMemoryBytes = 2L << 30, NumThreads = s.Threads };
        using var llm = new Llm(options);
        int vocab = llm.Engine.Model.Config.VocabSize;
        var prompts = new List<IReadOnlyList<int>>();
        var outLens = new List<int>();
        for (int i = 0; i < s.NumSeqs; i++)
        {
            int len = rng.Next(s.MinInput, s.MaxInput + 1);
            prompts.Add(Enumerable.Range(0, len).Select(_ => rng.Next(3, vocab)).ToArray());
            outLens.Add(rng.Next(s.MinOutput, s.MaxOutput + 1));
        }
        Console.WriteLine($"model {model}: {s.NumSeqs} sequences, prompts {prompts.Sum(p => p.Count)} tokens, outputs {outLens.Sum()} tokens, threads {TorchSharp.torch.get_num_threads()}");

        // Warm-up: one short request so that lazy initialisation is not timed.
        llm.Generate([prompts[0].Take(8).ToArray()], new SamplingParams { Temperature = 0, MaxTokens = 2, IgnoreEos = true });

        var batched = Time("batched", () => GenerateAll(llm, prompts, outLens));
        Console.WriteLine($"batched engine time split: {llm.Engine.Counters.TimeSplit()}");
        RunResult sequential;
        using (var single = new Llm(new EngineOptions { Model = model, KvCacheMemoryBytes = 512L << 20, EnablePrefixCaching = false, MaxNumSeqs = 1, NumThreads = s.Threads }))
            sequential = Time("one at a time", () =>
            {
                for (int i = 0; i < prompts.Count; i++) GenerateAll(single, [prompts[i]], [outLens[i]]);
            });
        RunResult Time(string mode, Action run)
        {
            var sw = Stopwatch.StartNew();
            run();
            sw.Stop();
            double secs = sw.Elapsed.TotalSeconds;
            long p = prompts.Sum(x => x.Count), o = outLens.Sum();
            return new RunResult(mode, secs, p, o, o / secs, (p + o) / secs);
        }

        Console.WriteLine($"| mode | wall s | output tok/s | prompt+output tok/s |");
        Console.WriteLine($"|---|---|---|---|");
        foreach (var r in new[] { batched, sequential })
            Console.WriteLine($"| {r.Mode} | {r.Seconds:F2} | {r.OutputTokensPerSecond:F1} | {r.TotalTokensPerSecond:F1} |");
        Console.WriteLine($"batched / one-at-a-time output throughput: {batched.OutputTokensPerSecond / sequential.OutputTokensPerSecond:F2}x");
        if (s.Json is not null)
            File.WriteAllText(s.Json, JsonSerializer.Serialize(new { settings = s, batched, sequential, ratio = batched.OutputTokensPerSecond / sequential.OutputTokensPerSecond }, new JsonSerializerOptions { WriteIndented = true }));
        return 0;
    }

    private static void GenerateAll(Llm llm, IReadOnlyList<IReadOnlyList<int>> prompts, IReadOnlyList<int> outLens)
    {
        var engine = llm.Engine;
        var ids = prompts.Select((p, i) => engine.AddRequest(p, new SamplingParams { Temperature = 0, MaxTokens = outLens[i], IgnoreEos = true })).ToHashSet();
        while (engine.HasUnfinishedRequests) engine.Step();
    }
}
