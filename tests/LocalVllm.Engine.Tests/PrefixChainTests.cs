using LocalVllm.Engine.Core;

namespace LocalVllm.Engine.Tests;

/// <summary>
/// The prefix cache is a chain: a block is found only under the same whole prefix, and a hit is confirmed by its
/// tokens, so no request ever reads KV computed for other tokens. Reference: each prompt run alone, without caching.
/// </summary>
[Trait("Category", "Fixtures")]
public sealed class PrefixChainTests
{
    private static int[] Block(int seed) => [.. Enumerable.Range(0, 16).Select(i => 3 + (seed * 37 + i * 11) % 480)];

    private static readonly int[] A = Block(1), B = Block(2), C = Block(3), D = Block(4), X = [7, 8, 9], Y = [10, 11, 12, 13];

    private static IReadOnlyList<int> Alone(int[] prompt)
    {
        using var llm = new Llm(EngineHarness.Options("tiny-llama", o => o.EnablePrefixCaching = false));
        return llm.Generate([prompt], EngineHarness.Greedy(6))[0].Outputs[0].TokenIds;
    }

    /// <summary>Runs one request to the end, checking the block invariants against the live sequences after every step.</summary>
    private static RequestOutput Run(LlmEngine engine, int[] prompt)
    {
        var id = engine.AddRequest(prompt, EngineHarness.Greedy(6));
        RequestOutput? last = null;
        while (engine.HasUnfinishedRequests)
        {
            foreach (var o in engine.Step()) if (o.RequestId == id) last = o;
            engine.Blocks.CheckInvariants(engine.Scheduler.Unfinished);
        }
        return last!;
    }

    [Fact]
    public void An_identical_block_under_another_prefix_is_not_a_hit()
    {
        using var llm = new Llm(EngineHarness.Options("tiny-llama", o => o.UsePlainPrefixCaching()));
        var engine = llm.Engine;
        int[] dbcy = [.. D, .. B, .. C, .. Y], abcx = [.. A, .. B, .. C, .. X], abcy = [.. A, .. B, .. C, .. Y];

        // B and C are first computed after D: they must not be served to a request that has them after A.
        var first = Run(engine, dbcy);
        Assert.Equal(0, first.NumCachedTokens);
        var second = Run(engine, abcx);
        Assert.Equal(0, second.NumCachedTokens); // A is new, so nothing after it can be a hit
        var third = Run(engine, abcy);
        Assert.Equal(48, third.NumCachedTokens); // A, B, C as computed after A
        var fourth = Run(engine, dbcy);
        Assert.Equal(48, fourth.NumCachedTokens); // D, B, C as computed after D

        Assert.Equal(Alone(dbcy), first.Outputs[0].TokenIds);
        Assert.Equal(Alone(abcx), second.Outputs[0].TokenIds);
        Assert.Equal(Alone(abcy), third.Outputs[0].TokenIds);
        Assert.Equal(Alone(dbcy), fourth.Outputs[0].TokenIds);
        EngineHarness.AssertNoLeaks(engine);
    }

    [Fact]
    public void Forced_hash_collisions_never_serve_a_block_whose_tokens_differ()
    {
        using var llm = new Llm(EngineHarness.Options("tiny-llama", o => o.UsePlainPrefixCaching()));
        var engine = llm.Engine;
        engine.Blocks.HashTransform = h => h & 0x3; // four hash values for every block there is
        var prompts = new[] { (int[])[.. A, .. B, .. X], [.. C, .. D, .. Y], [.. A, .. C, .. Y], [.. D, .. A, .. X], [.. A, .. B, .. Y] };
        foreach (var p in prompts)
        {
            var output = Run(engine, p);
            Assert.Equal(Alone(p), output.Outputs[0].TokenIds);
        }
        // The last prompt shares A and B with the first under the same prefix: still a hit despite the collisions
        // around it, or a miss where another block took the hash; never a wrong block.
        EngineHarness.AssertNoLeaks(engine);
    }
}
