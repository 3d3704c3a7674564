using System.Diagnostics;
using System.Text.Json;
using LocalVllm.Engine;
using LocalVllm.Engine.Kernels.Cpu;

namespace LocalVllm.Bench;

/// <summary>
/// Speculative decoding by prompt lookup against plain decoding, same weights, same process: <c>--requests</c>
/// greedy requests at once (1: the latency case of a single user), EOS ignored, <c>--tokens</c> each, the engines
/// taking turns going first for <c>--repeat</c> rounds. Prompts: the stories260K fixture's texts (a trained model, whose
/// stories repeat names and phrases) or random ids (a random-weight model, whose greedy output falls into loops).
/// Reported: output tokens per second of each, their ratio, drafts accepted per draft proposed, tokens per step, and
/// whether every output matched the plain engine's.
/// </summary>
internal static class SpecBench
{
    public sealed record Settings(string Size, int Requests, int Tokens, int SpeculativeTokens, int Repeat, int? Threads, string? Json, float Temperature = 0);

    public sealed record Run(string Engine, double Seconds, long Tokens, double TokensPerSecond, long Steps, long Drafts, long Accepted);

    public static int Execute(Settings s)
    {
        TorchRuntime.Configure();
        var model = BenchModels.Resolve(s.Size);
        EngineOptions Options(bool speculate) => new()
        {
            Model = model, KvCacheMemoryBytes = 1L << 30, NumThreads = s.Threads, EnablePrefixCaching = false,
            Speculative = speculate ? new SpeculativeConfig { NumSpeculativeTokens = s.SpeculativeTokens } : null,
        };
        using var plain = new Llm(Options(false));
        using var spec = new Llm(Options(true));
        int vocab = plain.Engine.Model.Config.VocabSize;
        var rng = new Random(0);
        IReadOnlyList<int>[] prompts = plain.Engine.Tokenizer is { } tok && s.Size == "stories"
            ? BenchModels.StoriesPrompts().Select(t => (IReadOnlyList<int>)tok.Encode(t)).ToArray()
            : Enumerable.Range(0, 6).Select(_ => (IReadOnlyList<int>)Enumerable.Range(0, 64).Select(_ => rng.Next(3, vocab)).ToArray()).ToArray();
        // Sampled (unseeded) outputs differ from run to run, so only greedy runs are checked for identical outputs.
        var sampling = new SamplingParams { Temperature = s.Temperature, MaxTokens = s.Tokens, IgnoreEos = true };
        Console.WriteLine($"model {model}: {prompts.Length} prompts, {s.Requests} at a time, {s.Tokens} tokens each, {s.SpeculativeTokens} draft tokens at most, threads {TorchSharp.torch.get_num_threads()}");

        // Warm-up, and the reference outputs every round is checked against.
        var reference = Generate(plain, prompts, sampling, s.Requests);
        Generate(spec, prompts, sampling, s.Requests);
        bool allSame = true;
        var runs = new List<Run>();
        for (int r = 0; r < s.Repeat; r++)
            foreach (var which in r % 2 == 0 ? new[] { "plain", "speculative" } : ["speculative", "plain"])
            {
                var llm = which == "plain" ? plain : spec;
                var before = llm.Engine.GetStats();
                var sw = Stopwatch.StartNew();
                var outputs = Generate(llm, prompts, sampling, s.Requests);
                double secs = sw.Elapsed.TotalSeconds;
                var after = llm.Engine.GetStats();
                if (s.Temperature == 0) allSame &= outputs.Zip(reference).All(p => p.First.SequenceEqual(p.Second));
                long tokens = outputs.Sum(o => (long)o.Length);
                var run = new Run(which, secs, tokens, tokens / secs, after.Steps - before.Steps, after.SpecDraftTokens - before.SpecDraftTokens,
                    after.SpecAcceptedTokens - before.SpecAcceptedTokens);
                runs.Add(run);
                Console.WriteLine($"  round {r + 1}, {which}: {run.TokensPerSecond:F1} tok/s, {run.Steps} steps" +
                                  (which == "plain" ? "" : $", {run.Accepted} of {run.Drafts} drafts accepted"));
            }
        Run Median(string which)
        {
            var mine = runs.Where(x => x.Engine == which).OrderBy(x => x.TokensPerSecond).ToList();
            return mine[mine.Count / 2];
        }
        var p = Median("plain");
        var sp = Median("speculative");
        double ratio = sp.TokensPerSecond / p.TokensPerSecond;
        Console.WriteLine($"  plain {p.TokensPerSecond:F1} tok/s ({(double)p.Tokens / p.Steps:F2} tokens per step), speculative {sp.TokensPerSecond:F1} tok/s " +
                          $"({(double)sp.Tokens / sp.Steps:F2} tokens per step, {(double)sp.Accepted / Math.Max(1, sp.Drafts):P0} of drafts accepted): x{ratio:F2}; " +
                          (s.Temperature == 0 ? $"outputs identical: {allSame}" : "sampled: outputs not compared"));
        if (s.Json is not null)
            File.WriteAllText(s.Json, JsonSerializer.Serialize(new { settings = s, runs, ratio, allSame }, new JsonSerializerOptions { WriteIndented = true }));
        return allSame ? 0 : 1;
    }

    /// <summary>Every prompt, <paramref name="atOnce"/> at a time; the output ids in prompt order.</summary>
    private static int[][] Generate(Llm llm, IReadOnlyList<int>[] prompts, SamplingParams sampling, int atOnce)
    {
        var result = new int[prompts.Length][];
        for (int i = 0; i < prompts.Length; i += atOnce)
        {
            var chunk = prompts.Skip(i).Take(atOnce).ToArray();
            var outputs = llm.Generate(chunk, sampling);
            for (int j = 0; j < chunk.Length; j++) result[i + j] = outputs[j].Outputs[0].TokenIds.ToArray();
        }
        return result;
    }
}
