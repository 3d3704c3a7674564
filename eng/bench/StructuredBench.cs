using System.Diagnostics;
using LocalVllm.Engine;
using LocalVllm.Engine.Kernels.Cpu;
using TorchSharp;

namespace LocalVllm.Bench;

/// <summary>
/// Structured outputs end to end: a shared workload (e.g. qwen3-b16: 16 requests, their prompt and output lengths)
/// run unconstrained and with every request under a JSON Schema, alternating, same model (random weights of
/// Qwen3-0.6B's shape with the real Qwen3 tokenizer), same threads, greedy. The schema's strings and arrays are open,
/// so a random model rarely completes it before its length; a second, record-like schema is mostly forced bytes
/// (jump-forward's case). Each constrained run is paired with an unconstrained run at the same per-request output
/// lengths; throughput is tokens per second of wall time (prompt plus output), the run with the median wall time
/// reported.
/// </summary>
internal static class StructuredBench
{
    public sealed record Settings(string Workload, int Threads, int Repeat);

    private const string Schema = """
        {"type": "object", "properties": {"title": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
         "priority": {"enum": ["low", "high"]}}, "required": ["title", "tags", "priority"], "additionalProperties": false}
        """;

    // A finite record with long fixed keys, enums and booleans (as extraction and tool-call arguments look): the model
    // completes it, and most of its bytes are forced: what jump-forward saves is measured on this one.
    private const string RecordSchema = """
        {"type": "object", "properties": {
            "temperature_celsius": {"type": "integer", "minimum": -50, "maximum": 50},
            "weather_condition": {"enum": ["sunny", "partly_cloudy", "overcast", "raining", "snowing"]},
            "wind_direction": {"enum": ["north", "east", "south", "west"]},
            "is_severe_weather_warning_active": {"type": "boolean"}},
         "required": ["temperature_celsius", "weather_condition", "wind_direction", "is_severe_weather_warning_active"],
         "additionalProperties": false}
        """;

    public static int Run(Settings s)
    {
        TorchRuntime.Configure();
        torch.set_num_threads(s.Threads);
        var w = Workload.Load(s.Workload);
        var model = ServeBench.WithTokenizer(BenchModels.Resolve("qwen3-0.6b"));
        EngineOptions Options(bool jump) => new()
        {
            Model = model, KvCacheMemoryBytes = 2L << 30, NumThreads = s.Threads, MaxNumSeqs = 256, EnablePrefixCaching = false, EnableJumpForward = jump,
        };
        // Two engines on the same weights: jump-forward on (the default) and off, to measure what it saves.
        using var llm = new Llm(Options(jump: true));
        using var noJump = new Llm(Options(jump: false));
        var constraint = StructuredOutputs.ForJsonSchema(Schema);
        var record = StructuredOutputs.ForJsonSchema(RecordSchema);
        // Warm-up: compile the schema, fill the mask cache's common states, let the JIT settle.
        foreach (var e in new[] { llm, noJump })
        {
            e.Generate([w.Prompts[0]], new SamplingParams { Temperature = 0, MaxTokens = 32, IgnoreEos = true, StructuredOutputs = constraint });
            e.Generate([w.Prompts[0]], new SamplingParams { Temperature = 0, MaxTokens = 32, IgnoreEos = true, StructuredOutputs = record });
            e.Generate([w.Prompts[0]], new SamplingParams { Temperature = 0, MaxTokens = 32, IgnoreEos = true });
        }
        // Each constrained run is compared with an unconstrained run of the same requests at the same per-request output
        // lengths (EOS ignored), so both runs process the same tokens and only the constraint's cost and jump-forward's
        // saving differ.
        var plain = new List<Measure>();
        var constrained = new List<Measure>();
        var jumped = new List<Measure>();
        var plainAtRecord = new List<Measure>();
        var unjumped = new List<Measure>();
        for (int rep = 0; rep < s.Repeat; rep++)
        {
            constrained.Add(RunOnce(llm, w, w.OutLens, constraint));
            plain.Add(RunOnce(llm, w, constrained[^1].Lengths, null));
            jumped.Add(RunOnce(llm, w, w.OutLens, record));
            plainAtRecord.Add(RunOnce(llm, w, jumped[^1].Lengths, null));
            unjumped.Add(RunOnce(noJump, w, w.OutLens, record));
            Console.WriteLine($"  run {rep + 1}: open schema {constrained[^1]}; unconstrained at its lengths {plain[^1]}; " +
                $"record with jump-forward {jumped[^1]}; unconstrained at its lengths {plainAtRecord[^1]}; record without jump-forward {unjumped[^1]}");
        }
        var p = Median(plain);
        var c = Median(constrained);
        var j = Median(jumped);
        var pj = Median(plainAtRecord);
        var u = Median(unjumped);
        double Rate(Measure r) => (w.PromptTokens + r.Tokens) / r.Wall;
        Console.WriteLine($"{w.Name}, open schema: unconstrained {Rate(p):F1} tok/s ({p.Tokens} output tokens, {p.Steps} steps), " +
            $"JSON Schema {Rate(c):F1} tok/s ({c.Tokens} output tokens, {c.Steps} steps, {c.Jumped} appended by jump-forward): {100 * Rate(c) / Rate(p):F1}%");
        Console.WriteLine($"{w.Name}, record schema: unconstrained {Rate(pj):F1} tok/s ({pj.Tokens} output tokens, {pj.Steps} steps), " +
            $"JSON Schema with jump-forward {Rate(j):F1} tok/s ({j.Tokens} output tokens, {j.Steps} steps, {j.Jumped} appended): {100 * Rate(j) / Rate(pj):F1}%");
        Console.WriteLine($"{w.Name}, record schema without jump-forward: {u.Tokens} output tokens in {u.Steps} steps, wall {u.Wall:F2} s against {j.Wall:F2} s with it ({u.Wall / j.Wall:F2}x)");
        return 0;
    }

    private sealed record Measure(double Wall, long Tokens, long Steps, long Jumped, int[] Lengths)
    {
        public override string ToString() => $"{Tokens} output tokens in {Wall:F2} s, {Steps} steps, {Jumped} jumped";
    }

    private static Measure Median(List<Measure> runs) => runs.OrderBy(r => r.Wall).ElementAt(runs.Count / 2);

    private static Measure RunOnce(Llm llm, Workload w, int[] outLens, StructuredOutputs? constraint)
    {
        var engine = llm.Engine;
        long steps = engine.Counters.Steps, jumped = engine.Counters.JumpForwardTokens;
        var index = new Dictionary<string, int>();
        var lengths = new int[w.Prompts.Length];
        var sw = Stopwatch.StartNew();
        for (int i = 0; i < w.Prompts.Length; i++)
            index[engine.AddRequest(w.Prompts[i], new SamplingParams { Temperature = 0, MaxTokens = outLens[i], IgnoreEos = true, StructuredOutputs = constraint })] = i;
        long tokens = 0;
        while (engine.HasUnfinishedRequests)
            foreach (var o in engine.Step())
                if (o.Finished)
                {
                    tokens += o.Outputs[0].TokenIds.Count;
                    lengths[index[o.RequestId]] = o.Outputs[0].TokenIds.Count;
                }
        return new Measure(sw.Elapsed.TotalSeconds, tokens, engine.Counters.Steps - steps, engine.Counters.JumpForwardTokens - jumped, lengths);
    }
}
