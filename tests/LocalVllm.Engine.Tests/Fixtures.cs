using System.Text.Json.Nodes;

namespace LocalVllm.Engine.Tests;

// Shared with tests/LocalVllm.Tests (linked file).

/// <summary>The shared fixtures (../shared/fixtures beside the checkout), found from the test's bin folder upwards.</summary>
internal static class Fixtures
{
    private static readonly Lazy<string> _root = new(() =>
    {
        var env = Environment.GetEnvironmentVariable("LOCALVLLM_FIXTURES");
        if (!string.IsNullOrEmpty(env) && Directory.Exists(env)) return env;
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            var candidate = Path.Combine(dir.FullName, "shared", "fixtures");
            if (Directory.Exists(candidate)) return candidate;
        }
        throw new DirectoryNotFoundException(
            "Test fixtures not found: expected a 'shared/fixtures' folder beside the checkout (../shared/fixtures) or LOCALVLLM_FIXTURES set.");
    });

    public static string Root => _root.Value;

    public static string Model(string name)
    {
        var path = Path.Combine(Root, name);
        if (!Directory.Exists(path)) throw new DirectoryNotFoundException($"Fixture model '{name}' not found at '{path}'.");
        return path;
    }

    public static JsonObject Reference(string name) =>
        JsonNode.Parse(File.ReadAllText(Path.Combine(Model(name), "reference.json")))!.AsObject();

    public static int[] Ints(JsonNode? node) => node!.AsArray().Select(n => n!.GetValue<int>()).ToArray();

    /// <summary>Floats written as shortest round-trip float32 decimals: parse as double, cast to float.</summary>
    public static float[] Floats(JsonNode? node) => node!.AsArray().Select(n => (float)n!.GetValue<double>()).ToArray();

    public static readonly string[] IdModels = ["tiny-llama", "tiny-llama-sharded", "tiny-qwen2"];
}
