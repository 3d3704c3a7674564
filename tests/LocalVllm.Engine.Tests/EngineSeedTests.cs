namespace LocalVllm.Engine.Tests;

/// <summary>The engine's seed (vLLM's --seed): unseeded requests sample the same tokens from one engine run to the next.</summary>
[Trait("Category", "Fixtures")]
public sealed class EngineSeedTests
{
    [Fact]
    public void Unseeded_requests_repeat_under_the_same_engine_seed_and_not_under_another()
    {
        string[] prompts = ["Once upon a time", "Lily and Ben went to the park", "The little dog", "Tom had a red ball"];
        var sampling = new SamplingParams { Temperature = 1, MaxTokens = 40, IgnoreEos = true };
        IReadOnlyList<int>[] Run(int? seed)
        {
            using var llm = new Llm(EngineHarness.Options("stories260K", o => o.Seed = seed));
            var first = llm.Generate(prompts, sampling).Select(o => o.Outputs[0].TokenIds).ToArray();
            // A request with its own seed still follows it, whatever the engine's seed.
            var own = llm.Generate(prompts[..1], sampling with { Seed = 42 })[0].Outputs[0].TokenIds;
            return [.. first, own];
        }
        var a = Run(5);
        var b = Run(5);
        var c = Run(6);
        Assert.Equal(a, b);
        Assert.NotEqual(a[..4], c[..4]);
        Assert.Equal(a[4], c[4]);
        Assert.Equal(a[4], Run(null)[4]);
    }
}
