using System.Diagnostics;
using System.Text.Json;
using LocalVllm.Engine;
using LocalVllm.Engine.Core;
using LocalVllm.Engine.Kernels.Cpu;

namespace LocalVllm.Bench;

/// <summary>
/// A workload shaped like a multi-agent app: A agents, each with its own long system prompt + tool list; Q concurrent
/// conversations (spread over the agents) of T turns, each turn re-sending the whole history; plus a RAG workload (one
/// document, questions arriving together). Run three ways in one process on the same weights: no prefix caching,
/// plain automatic prefix caching (LRU, no dedup, no pinning), and the agent-tuned cache (dedup of concurrent heads,
/// cache-aware ordering, shared-aware eviction, agents' heads pinned at start-up).
/// </summary>
internal static class AgentsBench
{
    public sealed record Settings(string Size, int Agents, int Conversations, int Turns, int HeadTokens, int UserTokens, int ReplyTokens,
        int DocTokens, int RagQuestions, int MaxNumBatchedTokens, int? Threads, string? Json);

    public sealed record ModeResult(string Mode, long PrefillTokensComputed, long PromptTokens, double TtftP50Ms, double TtftP95Ms,
        double Seconds, double RequestsPerSecond, long Requests);

    public static int Run(Settings s)
    {
        TorchRuntime.Configure();
        var model = BenchModels.Resolve(s.Size);
        var rng = new Random(7);
        int Vocab() { using var probe = System.IO.File.OpenRead(System.IO.Path.Combine(model, "config.json")); return System.Text.Json.Nodes.JsonNode.Parse(probe)!["vocab_size"]!.GetValue<int>(); }
        int vocab = Vocab();
        int[] Ids(int n) => Enumerable.Range(0, n).Select(_ => rng.Next(3, vocab - 1)).ToArray();
        var heads = Enumerable.Range(0, s.Agents).Select(_ => Ids(s.HeadTokens)).ToArray();
        var userTurns = Enumerable.Range(0, s.Conversations).Select(_ => Enumerable.Range(0, s.Turns).Select(_ => Ids(s.UserTokens)).ToArray()).ToArray();
        var doc = Ids(s.DocTokens);
        var questions = Enumerable.Range(0, s.RagQuestions).Select(_ => Ids(s.UserTokens)).ToArray();
        Console.WriteLine($"model {model}; {s.Agents} agents x {s.HeadTokens}-token heads, {s.Conversations} conversations x {s.Turns} turns, " +
                          $"RAG {s.DocTokens}-token document x {s.RagQuestions} questions; MaxNumBatchedTokens {s.MaxNumBatchedTokens}");

        var modes = new (string Name, Action<EngineOptions> Configure, bool Pin)[]
        {
            ("no prefix caching", o => o.EnablePrefixCaching = false, false),
            ("plain prefix caching", o => o.UsePlainPrefixCaching(), false),
            ("agent-tuned, no pinning", o => { }, false),
            ("agent-tuned", o => { }, true),
        };
        var results = new List<ModeResult>();
        foreach (var (name, configure, pin) in modes)
        {
            var options = new EngineOptions { Model = model, KvCacheMemoryBytes = 4L << 30, MaxNumBatchedTokens = s.MaxNumBatchedTokens, NumThreads = s.Threads };
            configure(options);
            if (pin) options.PinnedPrefixTokenIds = [.. heads.Select(h => (IReadOnlyList<int>)h), doc];
            using var llm = new Llm(options);
            var engine = llm.Engine;
            long prefillBefore = engine.Counters.PrefillTokens; // start-up pinning is paid once, before traffic
            var ttfts = new List<double>();
            long promptTokens = 0, requests = 0;
            var sw = Stopwatch.StartNew();
            var histories = Enumerable.Range(0, s.Conversations).Select(c => new List<int>(heads[c % s.Agents])).ToArray();
            for (int t = 0; t < s.Turns; t++)
            {
                var prompts = histories.Select((h, c) => (IReadOnlyList<int>)[.. h, .. userTurns[c][t]]).ToArray();
                var outputs = RunTogether(engine, prompts, s.ReplyTokens);
                for (int c = 0; c < s.Conversations; c++)
                {
                    histories[c] = [.. prompts[c], .. outputs[c].Outputs[0].TokenIds];
                    ttfts.Add(outputs[c].TimeToFirstTokenSeconds!.Value * 1000);
                }
                promptTokens += prompts.Sum(p => p.Count);
                requests += prompts.Length;
            }
            var rag = questions.Select(q => (IReadOnlyList<int>)[.. doc, .. q]).ToArray();
            foreach (var o in RunTogether(engine, rag, s.ReplyTokens)) ttfts.Add(o.TimeToFirstTokenSeconds!.Value * 1000);
            promptTokens += rag.Sum(p => p.Count);
            requests += rag.Length;
            sw.Stop();
            ttfts.Sort();
            var r = new ModeResult(name, engine.Counters.PrefillTokens - prefillBefore, promptTokens, Percentile(ttfts, 0.5), Percentile(ttfts, 0.95),
                sw.Elapsed.TotalSeconds, requests / sw.Elapsed.TotalSeconds, requests);
            results.Add(r);
            Console.WriteLine($"{name}: prefill {r.PrefillTokensComputed} of {r.PromptTokens} prompt tokens, TTFT p50 {r.TtftP50Ms:F0} ms p95 {r.TtftP95Ms:F0} ms, {r.Seconds:F1} s");
        }

        var baseline = results[0];
        Console.WriteLine("| mode | prefill tokens computed | vs none | TTFT p50 ms | speed-up | TTFT p95 ms | speed-up | wall s | requests/s | speed-up |");
        Console.WriteLine("|---|---|---|---|---|---|---|---|---|---|");
        foreach (var r in results)
            Console.WriteLine($"| {r.Mode} | {r.PrefillTokensComputed} | {(double)r.PrefillTokensComputed / baseline.PrefillTokensComputed:P1} | {r.TtftP50Ms:F0} | {baseline.TtftP50Ms / r.TtftP50Ms:F1}x | {r.TtftP95Ms:F0} | {baseline.TtftP95Ms / r.TtftP95Ms:F1}x | {r.Seconds:F1} | {r.RequestsPerSecond:F2} | {r.RequestsPerSecond / baseline.RequestsPerSecond:F1}x |");
        if (s.Json is not null)
            File.WriteAllText(s.Json, JsonSerializer.Serialize(new { settings = s, results }, new JsonSerializerOptions { WriteIndented = true }));
        return 0;
    }

    /// <summary>Submits all prompts at once (concurrent arrival) and steps the engine until they finish.</summary>
    private static RequestOutput[] RunTogether(LlmEngine engine, IReadOnlyList<IReadOnlyList<int>> prompts, int replyTokens)
    {
        var sampling = new SamplingParams { Temperature = 0, MaxTokens = replyTokens, IgnoreEos = true };
        var ids = prompts.Select(p => engine.AddRequest(p, sampling)).ToArray();
        var done = new Dictionary<string, RequestOutput>();
        while (engine.HasUnfinishedRequests)
            foreach (var o in engine.Step()) if (o.Finished) done[o.RequestId] = o;
        return ids.Select(id => done[id]).ToArray();
    }

    private static double Percentile(List<double> sorted, double p) =>
        sorted.Count == 0 ? 0 : sorted[Math.Clamp((int)Math.Ceiling(p * sorted.Count) - 1, 0, sorted.Count - 1)];
}
