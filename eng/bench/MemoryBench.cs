using System.Diagnostics;
using System.Text.Json;
using LLama;
using LLama.Common;
using LocalVllm.Engine;
using LocalVllm.Engine.Kernels.Cpu;

namespace LocalVllm.Bench;

/// <summary>
/// Resident memory of a loaded model in each format, ours and llama.cpp's: each load runs in a fresh child process,
/// which reads its VmRSS before loading, loads (KV cache / context kept small), generates 4 tokens (so that
/// llama.cpp's memory-mapped weights are all paged in, as they are in service) and reads VmRSS again.
/// </summary>
internal static class MemoryBench
{
    public static int Run(string size, string? json)
    {
        var model = BenchModels.Resolve(size);
        var bf16 = BenchModels.Bf16Copy(model);
        // Write every GGUF before timing anything in a child (a child would otherwise write it while measured).
        foreach (var (dir, type) in new[] { (model, GgufType.F32), (bf16, GgufType.F16), (bf16, GgufType.BF16), (model, GgufType.Q8_0) })
            BenchModels.GgufFor(dir, type);
        var runs = new (string Format, string Engine, string Args)[]
        {
            ("f32", "LocalVllm", $"ours {model} float32 none"),
            ("f32", "llama.cpp F32", $"llama {BenchModels.GgufFor(model, GgufType.F32)}"),
            ("bf16", "LocalVllm", $"ours {bf16} auto none"),
            ("bf16", "llama.cpp F16", $"llama {BenchModels.GgufFor(bf16, GgufType.F16)}"),
            ("bf16", "llama.cpp BF16", $"llama {BenchModels.GgufFor(bf16, GgufType.BF16)}"),
            ("int8", "LocalVllm", $"ours {model} float32 int8"),
            ("int8", "llama.cpp Q8_0", $"llama {BenchModels.GgufFor(model, GgufType.Q8_0)}"),
        };
        var results = new List<object>();
        Console.WriteLine("| format | engine | resident MB after load |");
        Console.WriteLine("|---|---|---|");
        foreach (var (format, engine, args) in runs)
        {
            var psi = new ProcessStartInfo(Environment.ProcessPath!, $"\"{typeof(MemoryBench).Assembly.Location}\" memory-child {args}") { RedirectStandardOutput = true };
            using var p = Process.Start(psi)!;
            string output = p.StandardOutput.ReadToEnd();
            p.WaitForExit();
            var line = output.Split('\n').LastOrDefault(l => l.StartsWith("RSS-DELTA ", StringComparison.Ordinal))
                ?? throw new InvalidOperationException($"{engine} {format}: the child printed no figure (exit {p.ExitCode}):\n{output}");
            double mb = double.Parse(line["RSS-DELTA ".Length..], System.Globalization.CultureInfo.InvariantCulture);
            Console.WriteLine($"| {format} | {engine} | {mb:F0} |");
            results.Add(new { format, engine, residentMb = mb });
        }
        if (json is not null) File.WriteAllText(json, JsonSerializer.Serialize(new { size, results }, new JsonSerializerOptions { WriteIndented = true }));
        return 0;
    }

    /// <summary>The child: `ours DIR WEIGHTDTYPE QUANT` or `llama GGUF`.</summary>
    public static int Child(string[] args)
    {
        // Each engine's native libraries are loaded before the first reading: only the model is measured.
        if (args[0] == "llama") LlamaCppPeer.LoadNative();
        else
        {
            TorchRuntime.Configure();
            TorchSharp.torch.zeros(1).Dispose();
        }
        double before = Rss();
        int[] probe = [1, 2, 3, 4, 5, 6, 7, 8];
        if (args[0] == "ours")
        {
            using var llm = new Llm(new EngineOptions
            {
                Model = args[1], WeightDType = args[2], Quantization = args[3] == "none" ? null : args[3], KvCacheMemoryBytes = 16L << 20, NumThreads = 2,
            });
            llm.Generate([probe], new SamplingParams { Temperature = 0, MaxTokens = 4, IgnoreEos = true });
            Console.WriteLine($"RSS-DELTA {(Rss() - before).ToString(System.Globalization.CultureInfo.InvariantCulture)}");
        }
        else
        {
            using var peer = new LlamaCppPeer(args[1], 2, 64, 1);
            peer.Greedy(probe, 4);
            Console.WriteLine($"RSS-DELTA {(Rss() - before).ToString(System.Globalization.CultureInfo.InvariantCulture)}");
        }
        return 0;
    }

    /// <summary>This process's resident set in MB (VmRSS: anonymous and file-backed pages).</summary>
    private static double Rss()
    {
        foreach (var line in File.ReadLines("/proc/self/status"))
            if (line.StartsWith("VmRSS:", StringComparison.Ordinal))
                return long.Parse(line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1]) / 1024.0;
        throw new InvalidOperationException("No VmRSS in /proc/self/status.");
    }
}
