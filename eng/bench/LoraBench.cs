using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;
using LocalVllm.Engine;
using LocalVllm.Engine.Kernels.Cpu;
using LocalVllm.Engine.Loading;
using LocalVllm.Fixtures;
using static TorchSharp.torch;

namespace LocalVllm.Bench;

/// <summary>
/// What serving LoRA adapters costs: the same <c>--requests</c> greedy requests (random prompts, <c>--tokens</c>
/// each, EOS ignored) in one engine with LoRA on, all on the base model, all under one adapter, and half under each
/// of two adapters (two adapters in every batch), rank <c>--rank</c> on all seven projections of every layer, for
/// <c>--repeat</c> rounds in rotating order. Reported: output tokens per second of each and the ratio to the base run
/// of the same round, medians.
/// </summary>
internal static class LoraBench
{
    public sealed record Settings(string Size, int Requests, int Tokens, int Rank, int Repeat, int? Threads, string? Json);

    public sealed record Run(string Workload, double Seconds, long Tokens, double TokensPerSecond);

    public static int Execute(Settings s)
    {
        TorchRuntime.Configure();
        var model = BenchModels.Resolve(s.Size);
        var folders = new[] { Adapter(model, s.Rank, seed: 1), Adapter(model, s.Rank, seed: 2) };
        try
        {
            using var llm = new Llm(new EngineOptions
            {
                Model = model, KvCacheMemoryBytes = 1L << 30, NumThreads = s.Threads, EnablePrefixCaching = false,
                EnableLora = true, MaxLoras = 2, MaxLoraRank = Math.Max(16, s.Rank),
            });
            var a = new LoraRequest("a", 1, folders[0]);
            var b = new LoraRequest("b", 2, folders[1]);
            int vocab = llm.Engine.Model.Config.VocabSize;
            var rng = new Random(0);
            var prompts = Enumerable.Range(0, s.Requests).Select(_ => (IReadOnlyList<int>)Enumerable.Range(0, 64).Select(_ => rng.Next(3, vocab)).ToArray()).ToArray();
            var sampling = Enumerable.Repeat(new SamplingParams { Temperature = 0, MaxTokens = s.Tokens, IgnoreEos = true }, s.Requests).ToArray();
            var workloads = new Dictionary<string, LoraRequest?[]>
            {
                ["base"] = new LoraRequest?[s.Requests],
                ["one adapter"] = Enumerable.Repeat<LoraRequest?>(a, s.Requests).ToArray(),
                ["two adapters"] = Enumerable.Range(0, s.Requests).Select(i => (LoraRequest?)(i % 2 == 0 ? a : b)).ToArray(),
            };
            Console.WriteLine($"model {model}: {s.Requests} requests at once, {s.Tokens} tokens each, adapters of rank {s.Rank} on every projection, threads {get_num_threads()}");
            foreach (var loras in workloads.Values) llm.Generate(prompts, sampling, loras); // warm-up (and the adapters' first load)

            var runs = new List<Run>();
            var names = workloads.Keys.ToArray();
            for (int r = 0; r < s.Repeat; r++)
                for (int k = 0; k < names.Length; k++)
                {
                    var name = names[(k + r) % names.Length]; // rotating order: a host speeding up or slowing down favours none
                    var sw = Stopwatch.StartNew();
                    var outputs = llm.Generate(prompts, sampling, workloads[name]);
                    double secs = sw.Elapsed.TotalSeconds;
                    long tokens = outputs.Sum(o => (long)o.Outputs[0].TokenIds.Count);
                    runs.Add(new Run(name, secs, tokens, tokens / secs));
                    Console.WriteLine($"  round {r + 1}, {name}: {tokens / secs:F1} tok/s");
                }
            var ratios = new Dictionary<string, double>();
            foreach (var name in names)
            {
                var mine = runs.Where(x => x.Workload == name).Select(x => x.TokensPerSecond).Order().ToList();
                var byRound = Enumerable.Range(0, s.Repeat).Select(r => runs[r * names.Length + Array.IndexOf(RoundOrder(names, r), name)].TokensPerSecond
                                                                       / runs[r * names.Length + Array.IndexOf(RoundOrder(names, r), "base")].TokensPerSecond).Order().ToList();
                ratios[name] = byRound[byRound.Count / 2];
                Console.WriteLine($"  {name}: median {mine[mine.Count / 2]:F1} tok/s, {ratios[name]:P1} of the base run in the same round (median)");
            }
            if (s.Json is not null)
                File.WriteAllText(s.Json, JsonSerializer.Serialize(new { settings = s, runs, ratios }, new JsonSerializerOptions { WriteIndented = true }));
            return 0;
        }
        finally
        {
            foreach (var f in folders) Directory.Delete(f, recursive: true);
        }
    }

    private static string[] RoundOrder(string[] names, int round) => Enumerable.Range(0, names.Length).Select(k => names[(k + round) % names.Length]).ToArray();

    /// <summary>A PEFT adapter with random weights (A and B ~ N(0, 0.02)) on all seven projections of every layer of <paramref name="model"/>.</summary>
    private static string Adapter(string model, int rank, int seed)
    {
        var folder = Directory.CreateTempSubdirectory("bench-lora").FullName;
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(model, "config.json")))!;
        File.WriteAllText(Path.Combine(folder, "adapter_config.json"), new JsonObject
        {
            ["peft_type"] = "LORA", ["r"] = rank, ["lora_alpha"] = 2 * rank, ["bias"] = "none",
            ["target_modules"] = new JsonArray("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        }.ToJsonString());
        var shapes = new Dictionary<string, long[]>();
        foreach (var file in Directory.GetFiles(model, "*.safetensors"))
        {
            using var st = SafetensorsFile.Open(file);
            foreach (var (name, entry) in st.Entries) shapes[name] = entry.Shape;
        }
        var gen = new Generator().manual_seed(seed);
        var tensors = new Dictionary<string, Tensor>();
        int layers = config["num_hidden_layers"]!.GetValue<int>();
        for (int l = 0; l < layers; l++)
            foreach (var (block, module) in new[] { ("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj") })
            {
                var shape = shapes[$"model.layers.{l}.{block}.{module}.weight"];
                tensors[$"base_model.model.model.layers.{l}.{block}.{module}.lora_A.weight"] = randn([rank, shape[1]], generator: gen) * 0.02;
                tensors[$"base_model.model.model.layers.{l}.{block}.{module}.lora_B.weight"] = randn([shape[0], rank], generator: gen) * 0.02;
            }
        SafetensorsWriter.Write(Path.Combine(folder, "adapter_model.safetensors"), tensors);
        foreach (var t in tensors.Values) t.Dispose();
        return folder;
    }
}
