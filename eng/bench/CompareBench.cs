using System.Diagnostics;
using System.Text.Json;
using LocalVllm.Engine;
using LocalVllm.Engine.Diagnostics;
using LocalVllm.Engine.Kernels.Cpu;
using LocalVllm.Engine.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace LocalVllm.Bench;

/// <summary>
/// Our engine against llama.cpp on the shared workload files, same weights (HF safetensors for us, an F32 GGUF written
/// from them for llama.cpp), same thread count, greedy, EOS ignored; both checked to give the same greedy ids on a
/// short prompt before anything is timed. Also measures the machine's f32 GEMM ceiling in the same run.
/// </summary>
internal static class CompareBench
{
    public sealed record Settings(string[] Workloads, int Threads, string? Json, string? Markdown, bool OursOnly = false, bool Profile = false, int Repeat = 1,
        string Weights = "f32");

    /// <summary>
    /// The weight formats compared: ours (what the engine is given) against llama.cpp's matching types. bf16: the model
    /// rounded to bfloat16 as a checkpoint ships it, kept in bf16 by our engine, against llama.cpp's F16 and BF16 GGUFs
    /// of the same values (the faster is reported); int8: our int8 quantization at load against llama.cpp's Q8_0.
    /// </summary>
    private static (Func<string, string> Model, GgufType[] Peers, Action<EngineOptions> Configure) Format(string weights) => weights switch
    {
        "f32" => (m => m, [GgufType.F32], _ => { }),
        "bf16" => (BenchModels.Bf16Copy, [GgufType.F16, GgufType.BF16], _ => { }),
        "int8" => (m => m, [GgufType.Q8_0], o => o.Quantization = "int8"),
        _ => throw new ArgumentException($"Unknown --weights '{weights}': use f32, bf16 or int8."),
    };

    public static int Run(Settings s)
    {
        LlamaCppPeer.LoadNative();
        TorchRuntime.Configure();
        torch.set_num_threads(s.Threads);
        double ceiling = GemmCeiling();
        Console.WriteLine($"f32 GEMM ceiling ([1024,1024]x[1024,3072], {s.Threads} threads): {ceiling:F1} GFLOP/s");
        var rows = new List<(EngineRun Ours, EngineRun Peer, double FlopsPerToken)>();
        foreach (var name in s.Workloads)
        {
            var w = Workload.Load(name);
            string size = name.StartsWith("stories", StringComparison.Ordinal) ? "stories" : "qwen3-0.6b";
            var format = Format(s.Weights);
            var model = format.Model(BenchModels.Resolve(size));
            var cfg = ModelConfig.Load(Path.Combine(model, "config.json"));
            double flopsPerToken = 2.0 * ParameterCount(cfg);

            // llama.cpp first: its OpenMP runtime starts with the default wait policy before our engine sets
            // OMP_WAIT_POLICY=PASSIVE for libtorch's (a separate copy), so each engine runs with its own defaults.
            uint maxSeqLen = (uint)w.Prompts.Zip(w.OutLens).Max(p => p.First.Length + p.Second);
            // Each llama.cpp peer is loaded only while it runs (and unloaded after), so that two formats' weights and a
            // 64-sequence context never sit in memory beside our engine at once.
            var peers = s.OursOnly ? [] : format.Peers.Select(t => (Type: t, Gguf: BenchModels.GgufFor(model, t))).ToList();
            T WithPeer<T>(string gguf, Func<LlamaCppPeer, T> use)
            {
                using var peer = new LlamaCppPeer(gguf, s.Threads, maxSeqLen, (uint)Math.Max(1, w.Prompts.Length));
                return use(peer);
            }
            { // this workload's engine lives in this block
                var probe = w.Prompts[0].Take(16).ToArray();
                var theirs = peers.Select(p => WithPeer(p.Gguf, peer => peer.Greedy(probe, 8))).ToList();
                // No prefix caching: every run starts from an empty cache, as llama.cpp's fresh context does (and repeats of the
                // same prompts must not be served from the cache).
                var options = new EngineOptions { Model = model, KvCacheMemoryBytes = 6L << 30, NumThreads = s.Threads, MaxNumSeqs = 256, EnablePrefixCaching = false };
                format.Configure(options);
                using var llm = new Llm(options);
                Console.WriteLine($"{name}: weights {s.Weights} (ours: matrices in {llm.Engine.Model.MatrixDType}, {llm.Engine.Model.WeightBytes / 1e6:F0} MB)");

                // Same weights, same greedy ids on a short prompt, before anything is timed. Quantized formats differ
                // from each other legitimately where two logits are close: reported, not fatal (quality is measured
                // against float32 by the quality bench).
                var ours = llm.Generate([probe], new SamplingParams { Temperature = 0, MaxTokens = 8, IgnoreEos = true })[0].Outputs[0].TokenIds.ToArray();
                // llama.cpp's BF16 and Q8_0 paths round the activations (bf16, int8), and so does our int8 with AVX-VNNI,
                // each in its own way, so greedy ids may part at a near-tie; at least one peer computing on the same
                // weights must agree (F32, or F16 for bf16), except for int8, where quality is judged against float32 by
                // the quality bench.
                for (int i = 0; i < peers.Count; i++)
                {
                    string what = $"ours [{string.Join(",", ours)}], llama.cpp {peers[i].Type} [{string.Join(",", theirs[i])}]";
                    Console.WriteLine(ours.SequenceEqual(theirs[i])
                        ? $"{name}: greedy ids agree with llama.cpp {peers[i].Type} on a 16-token probe ({string.Join(",", ours)})"
                        : $"{name}: greedy ids differ from llama.cpp {peers[i].Type} (rounded activations part at a near-tie): {what}");
                }
                if (peers.Count > 0 && s.Weights != "int8" && !theirs.Any(t => ours.SequenceEqual(t)))
                    throw new InvalidOperationException($"The engines disagree on greedy ids for {name}: no llama.cpp peer agrees with ours.");

                // Repeats alternate the engines, so that a slow phase of this shared machine hits both; the run with the
                // median wall time of each engine is reported.
                var ourRuns = new List<EngineRun>();
                var peerRuns = peers.Select(_ => new List<EngineRun>()).ToList();
                for (int rep = 0; rep < s.Repeat; rep++)
                {
                    ForwardProfile.Reset();
                    ForwardProfile.Enabled = s.Profile;
                    ourRuns.Add(RunOurs(llm, w));
                    if (s.Profile) Console.WriteLine($"  ours, forward split: {ForwardProfile.Summary()}");
                    ForwardProfile.Enabled = false;
                    for (int i = 0; i < peers.Count; i++)
                    {
                        var one = WithPeer(peers[i].Gguf, peer => { peer.Run(w, out var figures); return figures; });
                        peerRuns[i].Add(one with { Engine = $"llama.cpp {peers[i].Type}" });
                    }
                    Console.WriteLine($"  run {rep + 1}: ours {ourRuns[^1].WallSeconds:F2} s" +
                        string.Concat(peers.Select((p, i) => $", llama.cpp {p.Type} {peerRuns[i][^1].WallSeconds:F2} s")));
                }
                var ourRun = Median(ourRuns);
                if (peers.Count == 0)
                {
                    Console.WriteLine($"  ours: prefill {ourRun.PrefillTokensPerSecond:F1} tok/s, decode {ourRun.DecodeTokensPerSecond:F1} tok/s, wall {ourRun.TotalTokensPerSecond:F1} tok/s ({ourRun.WallSeconds:F1} s)");
                    continue;
                }
                var medians = peerRuns.Select(Median).ToList();
                foreach (var m in medians.Where(_ => medians.Count > 1))
                    Console.WriteLine($"  {m.Engine}: prefill {m.PrefillTokensPerSecond:F1} tok/s, decode {m.DecodeTokensPerSecond:F1} tok/s, wall {m.WallSeconds:F1} s");
                var peerRun = medians.MinBy(r => r.WallSeconds)!;
                rows.Add((ourRun, peerRun, flopsPerToken));
                Print(ourRun, peerRun, ceiling, flopsPerToken);
            }
        }
        if (s.Json is not null)
            File.WriteAllText(s.Json, JsonSerializer.Serialize(new
            {
                date = DateTime.UtcNow, machine = $"{Environment.ProcessorCount} cores, {s.Threads} threads", gemmCeilingGflops = ceiling, repeat = s.Repeat, weights = s.Weights,
                runs = rows.Select(r => new { ours = r.Ours, llamaCpp = r.Peer, flopsPerToken = r.FlopsPerToken }),
            }, new JsonSerializerOptions { WriteIndented = true }));
        return 0;
    }

    private static EngineRun Median(List<EngineRun> runs) => runs.OrderBy(r => r.WallSeconds).ElementAt(runs.Count / 2);

    private static EngineRun RunOurs(Llm llm, Workload w)
    {
        var engine = llm.Engine;
        var countersBefore = engine.Counters.Snapshot();
        var wall = Stopwatch.StartNew();
        var ids = w.Prompts.Select((p, i) => engine.AddRequest(p, new SamplingParams { Temperature = 0, MaxTokens = w.OutLens[i], IgnoreEos = true })).ToList();
        double firstTokenAll = 0;
        var done = new HashSet<string>();
        var started = new HashSet<string>();
        var byRows = new SortedDictionary<int, (int Steps, double Ms)>();
        while (engine.HasUnfinishedRequests)
        {
            long t0 = Stopwatch.GetTimestamp();
            var outputs = engine.Step();
            double ms = Stopwatch.GetElapsedTime(t0).TotalMilliseconds;
            int bucket = outputs.Count;
            byRows[bucket] = byRows.TryGetValue(bucket, out var b) ? (b.Steps + 1, b.Ms + ms) : (1, ms);
            foreach (var o in outputs)
            {
                if (started.Add(o.RequestId) && started.Count == ids.Count) firstTokenAll = wall.Elapsed.TotalSeconds;
                if (o.Finished) done.Add(o.RequestId);
            }
        }
        Console.WriteLine("  ours, step time by requests in the step: " + string.Join(", ", byRows.Select(kv => $"{kv.Key}: {kv.Value.Steps} x {kv.Value.Ms / kv.Value.Steps:F0} ms")));
        double total = wall.Elapsed.TotalSeconds;
        Console.WriteLine($"  ours: {engine.Counters.TimeSplit(countersBefore)}");
        // With continuous batching prefill and decode overlap; "prefill" is until every request has its first token.
        return new EngineRun("LocalVllm", w.Name, firstTokenAll, total - firstTokenAll, total, w.PromptTokens, w.OutputTokens);
    }

    private static void Print(EngineRun ours, EngineRun peer, double ceiling, double flopsPerToken)
    {
        double Frac(double tokPerSec) => tokPerSec * flopsPerToken / 1e9 / ceiling;
        Console.WriteLine($"| {ours.Workload} | engine | prefill tok/s | decode tok/s | prompt+output tok/s (wall) | wall s | fraction of GEMM ceiling |");
        foreach (var r in new[] { ours, peer })
            Console.WriteLine($"| | {r.Engine} | {r.PrefillTokensPerSecond:F1} | {r.DecodeTokensPerSecond:F1} | {r.TotalTokensPerSecond:F1} | {r.WallSeconds:F1} | {Frac(r.TotalTokensPerSecond):P0} |");
        Console.WriteLine($"| | ratio | {ours.PrefillTokensPerSecond / peer.PrefillTokensPerSecond:F2}x | {ours.DecodeTokensPerSecond / peer.DecodeTokensPerSecond:F2}x | {ours.TotalTokensPerSecond / peer.TotalTokensPerSecond:F2}x | | |");
    }

    /// <summary>The best of ten timed batches of matmuls: a ceiling, so the least disturbed measurement is the right one.</summary>
    private static double GemmCeiling()
    {
        using var a = randn(1024, 1024);
        using var b = randn(1024, 3072);
        for (int i = 0; i < 3; i++) a.matmul(b).Dispose();
        double best = 0;
        const int n = 5;
        for (int round = 0; round < 10; round++)
        {
            var sw = Stopwatch.StartNew();
            for (int i = 0; i < n; i++) a.matmul(b).Dispose();
            best = Math.Max(best, 2.0 * 1024 * 1024 * 3072 * n / sw.Elapsed.TotalSeconds / 1e9);
        }
        return best;
    }

    private static long ParameterCount(ModelConfig c) =>
        CausalLm.ExpectedTensors(c).Where(kv => kv.Key != "model.embed_tokens.weight" || !c.TieWordEmbeddings)
            .Sum(kv => kv.Value.Aggregate(1L, (x, y) => x * y));
}
