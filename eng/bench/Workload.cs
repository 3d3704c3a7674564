using System.Text.Json.Nodes;

namespace LocalVllm.Bench;

/// <summary>A fixed workload file from shared/bench/workloads: prompt ids and output lengths per sequence.</summary>
internal sealed record Workload(string Name, int[][] Prompts, int[] OutLens)
{
    public long PromptTokens => Prompts.Sum(p => (long)p.Length);
    public long OutputTokens => OutLens.Sum(x => (long)x);

    public static Workload Load(string nameOrPath)
    {
        var path = File.Exists(nameOrPath) ? nameOrPath : BenchModels.FindShared(Path.Combine("bench", "workloads", nameOrPath.EndsWith(".json") ? nameOrPath : nameOrPath + ".json"));
        var json = JsonNode.Parse(File.ReadAllText(path))!;
        return new Workload(
            json["name"]?.GetValue<string>() ?? Path.GetFileNameWithoutExtension(path),
            json["prompts"]!.AsArray().Select(p => p!.AsArray().Select(x => x!.GetValue<int>()).ToArray()).ToArray(),
            json["out_lens"]!.AsArray().Select(x => x!.GetValue<int>()).ToArray());
    }
}

/// <summary>One engine's figures on one workload.</summary>
internal sealed record EngineRun(string Engine, string Workload, double PrefillSeconds, double DecodeSeconds, double WallSeconds,
    long PromptTokens, long OutputTokens)
{
    public double PrefillTokensPerSecond => PromptTokens / PrefillSeconds;
    public double DecodeTokensPerSecond => OutputTokens / DecodeSeconds;
    public double TotalTokensPerSecond => (PromptTokens + OutputTokens) / WallSeconds;
    public double OutputTokensPerSecond => OutputTokens / WallSeconds;
}
