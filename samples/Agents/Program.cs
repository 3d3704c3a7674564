using System.Diagnostics;
using LocalVllm.Engine;
using LocalVllm.Engine.Models;

// The Agents sample. Until the chat client lands it shows the engine's machinery through the offline API: a batch of
// agent-like requests that share a long head (a system prompt) runs through continuous batching and prefix caching.
string? model = null;
for (int i = 0; i < args.Length; i++)
    if (args[i] == "--model" && i + 1 < args.Length) model = args[++i];

if (model is null)
{
    model = Path.Combine(Path.GetTempPath(), "localvllm-demo-model");
    if (!File.Exists(Path.Combine(model, "model.safetensors")))
        RandomModel.Write(model, new RandomModelSpec { VocabSize = 1024, HiddenSize = 128, IntermediateSize = 256, NumHiddenLayers = 4 }, seed: 1);
    Console.WriteLine($"No --model given: using a small built-in demo model with random weights ({model}).");
    Console.WriteLine("Its answers are meaningless; only the machinery (batching, prefix caching) is shown.\n");
}

using var llm = new Llm(new EngineOptions { Model = model, KvCacheMemoryBytes = 64L << 20 });
var vocab = llm.Engine.Model.Config.VocabSize;
var rng = new Random(7);
int[] sharedHead = Enumerable.Range(0, 256).Select(_ => rng.Next(3, vocab)).ToArray();
var prompts = Enumerable.Range(0, 8)
    .Select(_ => (IReadOnlyList<int>)[.. sharedHead, .. Enumerable.Range(0, 24).Select(_ => rng.Next(3, vocab))])
    .ToArray();
var sampling = new SamplingParams { Temperature = 0, MaxTokens = 32, IgnoreEos = true };

for (int round = 1; round <= 2; round++)
{
    var sw = Stopwatch.StartNew();
    var outputs = llm.Generate(prompts, sampling);
    sw.Stop();
    Console.WriteLine($"Round {round}: {outputs.Count} requests in {sw.Elapsed.TotalSeconds:F2}s");
    Console.WriteLine($"{"request",-10}{"prompt",8}{"cached",8}{"output",8}{"ttft ms",10}");
    foreach (var o in outputs)
        Console.WriteLine($"{o.RequestId,-10}{o.PromptTokenIds.Count,8}{o.NumCachedTokens,8}{o.Outputs[0].TokenIds.Count,8}{o.TimeToFirstTokenSeconds * 1000,10:F1}");
    Console.WriteLine();
}
var c = llm.Engine.Counters;
Console.WriteLine($"Engine: {c.Steps} steps, {c.PrefillTokens} prefill tokens computed, {c.DecodeTokens} decode tokens.");
