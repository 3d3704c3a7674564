using System.Diagnostics;
using LocalVllm.Engine;
using LocalVllm.Engine.Kernels.Cpu;
using TorchSharp;

namespace LocalVllm.Bench;

/// <summary>
/// Structured outputs end to end: a shared workload (e.g. qwen3-b16: 16 requests, their prompt and output lengths)
/// run unconstrained and with every request under a JSON Schema, alternating, same model (random weights of
/// Qwen3-0.6B's shape with the real Qwen3 tokenizer), same threads, greedy. The schema's strings and arrays are open,
/// so a random model rarely completes it before its length; the tokens actually generated are counted, and
/// throughput is tokens per second of wall time (prompt plus output), the run with the median wall time reported.
/// </summary>
internal static class StructuredBench
{
    public sealed record Settings(string Workload, int Threads, int Repeat);

    private const string Schema = """
        {"type": "object", "properties": {"title": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
         "priority": {"enum": ["low", "high"]}}, "required": ["title", "tags", "priority"], "additionalProperties": false}
        """;

    public static int Run(Settings s)
    {
        TorchRuntime.Configure();
        torch.set_num_threads(s.Threads);
        var w = Workload.Load(s.Workload);
        var model = ServeBench.WithTokenizer(BenchModels.Resolve("qwen3-0.6b"));
        using var llm = new Llm(new EngineOptions { Model = model, KvCacheMemoryBytes = 6L << 30, NumThreads = s.Threads, MaxNumSeqs = 256, EnablePrefixCaching = false });
        var constraint = StructuredOutputs.ForJsonSchema(Schema);
        // Warm-up: compile the schema, fill the mask cache's common states, let the JIT settle.
        llm.Generate([w.Prompts[0]], new SamplingParams { Temperature = 0, MaxTokens = 32, IgnoreEos = true, StructuredOutputs = constraint });
        llm.Generate([w.Prompts[0]], new SamplingParams { Temperature = 0, MaxTokens = 32, IgnoreEos = true });
        var plain = new List<(double Wall, long Tokens)>();
        var constrained = new List<(double Wall, long Tokens)>();
        for (int rep = 0; rep < s.Repeat; rep++)
        {
            plain.Add(RunOnce(llm, w, null));
            constrained.Add(RunOnce(llm, w, constraint));
            Console.WriteLine($"  run {rep + 1}: unconstrained {plain[^1].Tokens} output tokens in {plain[^1].Wall:F2} s, constrained {constrained[^1].Tokens} in {constrained[^1].Wall:F2} s");
        }
        var p = plain.OrderBy(r => r.Wall).ElementAt(plain.Count / 2);
        var c = constrained.OrderBy(r => r.Wall).ElementAt(constrained.Count / 2);
        double pRate = (w.PromptTokens + p.Tokens) / p.Wall, cRate = (w.PromptTokens + c.Tokens) / c.Wall;
        Console.WriteLine($"{w.Name}: unconstrained {pRate:F1} tok/s ({p.Tokens} output tokens), JSON Schema {cRate:F1} tok/s ({c.Tokens} output tokens): {100 * cRate / pRate:F1}%");
        return 0;
    }

    private static (double Wall, long Tokens) RunOnce(Llm llm, Workload w, StructuredOutputs? constraint)
    {
        var engine = llm.Engine;
        var sw = Stopwatch.StartNew();
        for (int i = 0; i < w.Prompts.Length; i++)
            engine.AddRequest(w.Prompts[i], new SamplingParams { Temperature = 0, MaxTokens = w.OutLens[i], IgnoreEos = true, StructuredOutputs = constraint });
        long tokens = 0;
        while (engine.HasUnfinishedRequests)
            foreach (var o in engine.Step())
                if (o.Finished) tokens += o.Outputs[0].TokenIds.Count;
        return (sw.Elapsed.TotalSeconds, tokens);
    }
}
