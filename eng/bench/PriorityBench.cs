using System.Diagnostics;
using System.Text.Json;
using LocalVllm.Engine;
using LocalVllm.Engine.Kernels.Cpu;

namespace LocalVllm.Bench;

/// <summary>
/// Interactive requests (an agent's short calls) arriving while a batch of long background requests fills the engine:
/// their time to first token and end-to-end latency, and the background batch's throughput, under first-come-first-
/// served and under priority scheduling (background at priority 1, interactive at 0). The same workload runs under
/// both policies, which take turns going first; medians over the rounds.
/// </summary>
internal static class PriorityBench
{
    public sealed record Settings(string Size, int Background, int BackgroundTokens, int Interactive, int InteractiveTokens, int IntervalMs,
        int MaxNumSeqs, int Repeat, string? Json);

    public sealed record Run(string Policy, double InteractiveTtftP50Ms, double InteractiveTtftP90Ms, double InteractiveE2eP50Ms, double BackgroundTokensPerSecond);

    public static int Execute(Settings s)
    {
        TorchRuntime.Configure();
        var model = BenchModels.Resolve(s.Size);
        var runs = new List<Run>();
        for (int r = 0; r < s.Repeat; r++)
            foreach (var policy in r % 2 == 0 ? new[] { "fcfs", "priority" } : ["priority", "fcfs"])
            {
                var run = Once(model, policy, s);
                runs.Add(run);
                Console.WriteLine($"  round {r + 1}, {policy}: interactive TTFT p50 {run.InteractiveTtftP50Ms:F0} ms, p90 {run.InteractiveTtftP90Ms:F0} ms, " +
                                  $"end to end p50 {run.InteractiveE2eP50Ms:F0} ms; background {run.BackgroundTokensPerSecond:F0} tok/s");
            }
        Run Median(string policy)
        {
            var mine = runs.Where(x => x.Policy == policy).ToList();
            double M(Func<Run, double> f) => mine.Select(f).Order().ElementAt(mine.Count / 2);
            return new Run(policy, M(x => x.InteractiveTtftP50Ms), M(x => x.InteractiveTtftP90Ms), M(x => x.InteractiveE2eP50Ms), M(x => x.BackgroundTokensPerSecond));
        }
        var fcfs = Median("fcfs");
        var priority = Median("priority");
        Console.WriteLine($"{s.Size}: {s.Background} background requests x {s.BackgroundTokens} tokens, {s.Interactive} interactive x {s.InteractiveTokens} tokens " +
                          $"every {s.IntervalMs} ms, MaxNumSeqs {s.MaxNumSeqs} (median of {s.Repeat}):");
        foreach (var m in new[] { fcfs, priority })
            Console.WriteLine($"  {m.Policy,-8}: interactive TTFT p50 {m.InteractiveTtftP50Ms:F0} ms, p90 {m.InteractiveTtftP90Ms:F0} ms, end to end p50 {m.InteractiveE2eP50Ms:F0} ms; background {m.BackgroundTokensPerSecond:F0} tok/s");
        Console.WriteLine($"  priority / fcfs: interactive TTFT p50 x{priority.InteractiveTtftP50Ms / fcfs.InteractiveTtftP50Ms:F3}, end to end p50 x{priority.InteractiveE2eP50Ms / fcfs.InteractiveE2eP50Ms:F3}, " +
                          $"background throughput x{priority.BackgroundTokensPerSecond / fcfs.BackgroundTokensPerSecond:F2}");
        if (s.Json is not null)
            File.WriteAllText(s.Json, JsonSerializer.Serialize(new { settings = s, runs, fcfs, priority }, new JsonSerializerOptions { WriteIndented = true }));
        return 0;
    }

    private static Run Once(string model, string policy, Settings s)
    {
        using var engine = new AsyncLlmEngine(new EngineOptions
        {
            Model = model, KvCacheMemoryBytes = 1L << 30, MaxNumSeqs = s.MaxNumSeqs, EnablePrefixCaching = false, SchedulingPolicy = policy,
        });
        int vocab = engine.Engine.Model.Config.VocabSize;
        var rng = new Random(0);
        int[] Prompt() => Enumerable.Range(0, 64).Select(_ => rng.Next(3, vocab)).ToArray();
        bool byPriority = policy == "priority";
        SamplingParams Sampling(int tokens, int priority) => new()
        {
            Temperature = 0, MaxTokens = tokens, IgnoreEos = true, OutputKind = RequestOutputKind.Delta, Priority = byPriority ? priority : 0,
        };
        // Warm-up (JIT, the engine's buffers), not counted.
        foreach (var _ in engine.GenerateAsync(Prompt(), Sampling(8, 0)).ToBlockingEnumerable()) { }

        async Task<(double TtftMs, double E2eMs, long Tokens)> Request(int[] prompt, SamplingParams sampling)
        {
            long start = Stopwatch.GetTimestamp();
            double ttft = -1;
            long tokens = 0;
            await foreach (var o in engine.GenerateAsync(prompt, sampling))
            {
                if (ttft < 0 && o.Outputs[0].TokenIds.Count > 0) ttft = Stopwatch.GetElapsedTime(start).TotalMilliseconds;
                tokens += o.Outputs[0].TokenIds.Count;
            }
            return (ttft, Stopwatch.GetElapsedTime(start).TotalMilliseconds, tokens);
        }

        var backgroundPrompts = Enumerable.Range(0, s.Background).Select(_ => Prompt()).ToArray();
        var interactivePrompts = Enumerable.Range(0, s.Interactive).Select(_ => Prompt()).ToArray();
        long t0 = Stopwatch.GetTimestamp();
        var background = backgroundPrompts.Select(p => Task.Run(() => Request(p, Sampling(s.BackgroundTokens, 1)))).ToArray();
        var interactive = new List<Task<(double TtftMs, double E2eMs, long Tokens)>>();
        for (int i = 0; i < s.Interactive; i++)
        {
            Thread.Sleep(s.IntervalMs);
            var p = interactivePrompts[i];
            interactive.Add(Task.Run(() => Request(p, Sampling(s.InteractiveTokens, 0))));
        }
        var done = Task.WhenAll(interactive).GetAwaiter().GetResult();
        var bg = Task.WhenAll(background).GetAwaiter().GetResult();
        double seconds = Stopwatch.GetElapsedTime(t0).TotalSeconds;
        var ttfts = done.Select(x => x.TtftMs).Order().ToArray();
        var e2e = done.Select(x => x.E2eMs).Order().ToArray();
        return new Run(policy, ttfts[ttfts.Length / 2], ttfts[(int)(ttfts.Length * 0.9)], e2e[e2e.Length / 2], bg.Sum(x => x.Tokens) / seconds);
    }
}
