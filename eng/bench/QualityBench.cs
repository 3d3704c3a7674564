using System.Text.Json;
using System.Text.Json.Nodes;
using LocalVllm.Engine;
using LocalVllm.Engine.Core;
using LocalVllm.Engine.Kernels.Cpu;
using TorchSharp;
using static TorchSharp.torch;

namespace LocalVllm.Bench;

/// <summary>
/// Quality of the weight formats, measured the way llama.cpp's perplexity tool does with --kl-divergence: over a text,
/// every position's next-token distribution against our float32 engine's: mean KL divergence and top-1 agreement, for
/// our bf16 and int8, and for llama.cpp's F32 (a check: should be ~0) and Q8_0 GGUFs of the same weights.
/// Texts: stories260K's (the unconditional 200-token story and the reference cases' prompt + continuation), and for
/// the Qwen3-0.6B-shaped model a long token sequence (the qwen3-b16 workload's prompts, concatenated).
/// </summary>
internal static class QualityBench
{
    public sealed record Settings(string Size, int Tokens, int Threads, string? Json);

    public static int Run(Settings s)
    {
        LlamaCppPeer.LoadNative();
        TorchRuntime.Configure();
        torch.set_num_threads(s.Threads);
        var model = BenchModels.Resolve(s.Size);
        var texts = Texts(s.Size, model, s.Tokens);
        Console.WriteLine($"{s.Size}: {texts.Count} text(s), {texts.Sum(t => t.Length)} tokens");

        var results = new JsonObject();
        void Report(string name, List<float[][]> reference, List<float[][]> logits)
        {
            var (kl, top1, n) = Compare(reference, logits);
            float maxDiff = reference.Zip(logits).Max(t => t.First.Zip(t.Second).Max(r => r.First.Zip(r.Second).Max(v => MathF.Abs(v.First - v.Second))));
            Console.WriteLine($"| {name} | {kl:E3} | {top1:P2} | {n} | {maxDiff:E2} |");
            results[name] = new JsonObject { ["mean_kl"] = kl, ["top1_agreement"] = top1, ["positions"] = n, ["max_abs_logit_difference"] = maxDiff };
        }
        uint longest = (uint)texts.Max(t => t.Length);
        List<float[][]> Peer(string dir, GgufType type)
        {
            using var peer = new LlamaCppPeer(BenchModels.GgufFor(dir, type), s.Threads, longest, 1);
            return texts.Select(peer.AllLogits).ToList();
        }

        // 16-bit: the model rounded to bf16 (as a checkpoint ships it); the reference is our float32 expansion of it.
        var bf16Model = BenchModels.Bf16Copy(model);
        var bf16Reference = Logits(new EngineOptions { Model = bf16Model, WeightDType = "float32" }, texts);
        Console.WriteLine("| format (16-bit: against our float32 expansion of the bf16 weights) | mean KL (nats) | top-1 agreement | positions | max logit difference |");
        Console.WriteLine("|---|---|---|---|---|");
        Report("LocalVllm bf16", bf16Reference, Logits(new EngineOptions { Model = bf16Model }, texts));
        Report("llama.cpp BF16", bf16Reference, Peer(bf16Model, GgufType.BF16));
        Report("llama.cpp F16", bf16Reference, Peer(bf16Model, GgufType.F16));
        bf16Reference = null!;

        // 8-bit: the float32 model quantized; the reference is our float32 run of it.
        var reference = Logits(new EngineOptions { Model = model }, texts);
        Console.WriteLine("| format (8-bit: against our float32) | mean KL (nats) | top-1 agreement | positions | max logit difference |");
        Console.WriteLine("|---|---|---|---|---|");
        Report("LocalVllm int8", reference, Logits(new EngineOptions { Model = model, Quantization = "int8" }, texts));
        Report("llama.cpp Q8_0", reference, Peer(model, GgufType.Q8_0));
        Report("llama.cpp F32 (check: same weights unquantized)", reference, Peer(model, GgufType.F32));
        if (s.Json is not null)
            File.WriteAllText(s.Json, new JsonObject { ["size"] = s.Size, ["tokens"] = texts.Sum(t => t.Length), ["results"] = results }
                .ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        return 0;
    }

    private static List<int[]> Texts(string size, string model, int tokens)
    {
        if (size == "stories")
        {
            var reference = JsonNode.Parse(File.ReadAllText(Path.Combine(model, "reference.json")))!;
            static int[] Ints(JsonNode? n) => n!.AsArray().Select(x => x!.GetValue<int>()).ToArray();
            var story = reference["unconditional_story"]!;
            var list = new List<int[]>();
            list.Add([.. Ints(story["prompt_ids"]), .. Ints(story["greedy_ids"])]);
            list.AddRange(reference["cases"]!.AsArray().Select(c => (int[])[.. Ints(c!["prompt_ids"]), .. Ints(c["greedy_ids"])]));
            return list;
        }
        var w = Workload.Load("qwen3-b16");
        return [w.Prompts.SelectMany(p => p).Take(tokens).ToArray()];
    }

    /// <summary>Our logits at every position of each text, one sequence through the paged cache at a time.</summary>
    private static List<float[][]> Logits(EngineOptions options, List<int[]> texts)
    {
        options.KvCacheMemoryBytes = 1L << 30;
        options.EnablePrefixCaching = false;
        using var llm = new Llm(options);
        var engine = llm.Engine;
        var all = new List<float[][]>();
        foreach (var ids in texts)
        {
            using var scope = NewDisposeScope();
            var seq = new Sequence("quality", 0, ids, new SamplingParams { PromptLogprobs = 0 }, 0);
            engine.Blocks.Allocate(seq, [], ids.Length);
            try
            {
                var step = engine.Runner.ComputeLogits([new ScheduledSequence(seq, ids.Length)]);
                all.Add(Enumerable.Range(0, ids.Length).Select(i => step.Logits[i].data<float>().ToArray()).ToArray());
            }
            finally
            {
                engine.Blocks.Free(seq);
            }
        }
        return all;
    }

    private static (double MeanKl, double Top1, int Positions) Compare(List<float[][]> reference, List<float[][]> other)
    {
        double kl = 0;
        int agree = 0, n = 0;
        for (int t = 0; t < reference.Count; t++)
            for (int i = 0; i < reference[t].Length; i++)
            {
                var p = reference[t][i];
                var q = other[t][i];
                kl += Kl(p, q);
                if (Array.IndexOf(p, p.Max()) == Array.IndexOf(q, q.Max())) agree++;
                n++;
            }
        return (kl / n, (double)agree / n, n);
    }

    /// <summary>KL(softmax(p) || softmax(q)) in nats, in double precision.</summary>
    private static double Kl(float[] p, float[] q)
    {
        double mp = p.Max(), mq = q.Max(), zp = 0, zq = 0;
        for (int i = 0; i < p.Length; i++) { zp += Math.Exp(p[i] - mp); zq += Math.Exp(q[i] - mq); }
        double lzp = Math.Log(zp), lzq = Math.Log(zq), kl = 0;
        for (int i = 0; i < p.Length; i++)
        {
            double lp = p[i] - mp - lzp, lq = q[i] - mq - lzq;
            kl += Math.Exp(lp) * (lp - lq);
        }
        return Math.Max(0, kl);
    }
}
