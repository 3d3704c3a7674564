namespace LocalVllm.Engine.Tests;

/// <summary>vLLM's <c>cache_salt</c>: only requests with the same salt share prefix-cache blocks; the outputs never change.</summary>
[Trait("Category", "Fixtures")]
public sealed class CacheSaltTests
{
    [Fact]
    public void Only_requests_with_the_same_salt_share_cached_blocks()
    {
        using var llm = new Llm(EngineHarness.Options("stories260K"));
        var rng = new Random(11);
        IReadOnlyList<int> prompt = Enumerable.Range(0, 40).Select(_ => rng.Next(3, 512)).ToArray(); // two full blocks of 16, and a part
        var plain = EngineHarness.Greedy(8);
        var expected = llm.Generate([prompt], plain)[0].Outputs[0].TokenIds; // unsalted: its blocks are now cached

        (int Cached, IReadOnlyList<int> Tokens) Run(string? salt)
        {
            var o = llm.Generate([prompt], plain with { CacheSalt = salt })[0];
            return (o.NumCachedTokens, o.Outputs[0].TokenIds);
        }
        var runs = new[] { ("tenant-a", 0), ("tenant-a", 32), ("tenant-b", 0), (null, 32), ("tenant-b", 32), ("tenant-a", 32) }
            .Select(x => (x.Item1, x.Item2, Run(x.Item1))).ToList();
        foreach (var (salt, cached, (gotCached, tokens)) in runs)
        {
            Assert.Equal(expected, tokens);
            Assert.True(cached == gotCached, $"salt {salt ?? "(none)"}: {gotCached} cached tokens, expected {cached}");
        }
        Assert.Equal("CacheSalt", Assert.Throws<ArgumentException>(() => llm.Generate([prompt], plain with { CacheSalt = "" })).ParamName);
        EngineHarness.AssertNoLeaks(llm.Engine);
    }
}
