using LocalVllm.Engine.Core;


namespace LocalVllm.Engine.Tests;

/// <summary>Prefix caching tuned for agents: shared heads computed once, pinning, shared-aware eviction, multi-turn reuse.</summary>
[Trait("Category", "Fixtures")]
public sealed class AgentPrefixCachingTests
{
    // tiny-qwen3-chat: a context of 40,960 tokens, so 1,000-token heads fit; token ids drawn from its vocabulary.
    private const string Model = "tiny-qwen3-chat";

    private static int[] RandomIds(Random rng, int n) => Enumerable.Range(0, n).Select(_ => rng.Next(1000, 100000)).ToArray();

    private static IReadOnlyList<int>[] SharedHeadPrompts(int seed, int headLen, int n, int tailLen)
    {
        var rng = new Random(seed);
        var head = RandomIds(rng, headLen);
        return Enumerable.Range(0, n).Select(_ => (IReadOnlyList<int>)[.. head, .. RandomIds(rng, tailLen)]).ToArray();
    }

    [Fact]
    public void Eight_concurrent_requests_compute_an_uncached_1000_token_head_exactly_once()
    {
        var prompts = SharedHeadPrompts(1, 1000, 8, 20);
        var greedy = EngineHarness.Greedy(4);
        using var tuned = new Llm(EngineHarness.Options(Model, o => o.MaxNumBatchedTokens = 8192));
        using var plain = new Llm(EngineHarness.Options(Model, o => { o.MaxNumBatchedTokens = 8192; o.UsePlainPrefixCaching(); }));
        var a = tuned.Generate(prompts, greedy);
        var b = plain.Generate(prompts, greedy);

        int headBlocksTokens = 1000 / 16 * 16; // 992: the head's full blocks; the block holding the head's end differs per request
        long expected = 1020 + 7 * (1020 - headBlocksTokens);
        Assert.Equal(expected, tuned.Engine.Counters.PrefillTokens);
        Assert.Equal(8 * 1020, plain.Engine.Counters.PrefillTokens); // plain caching computes the head 8 times in one step
        Assert.Equal(7 * headBlocksTokens, a.Sum(o => o.NumCachedTokens));
        for (int i = 0; i < prompts.Length; i++) Assert.Equal(b[i].Outputs[0].TokenIds, a[i].Outputs[0].TokenIds);
        EngineHarness.AssertNoLeaks(tuned.Engine);
    }

    [Fact]
    public void A_pinned_prefix_survives_a_flood_that_evicts_everything_else()
    {
        var rng = new Random(2);
        var pinned = RandomIds(rng, 160);
        var unpinned = RandomIds(rng, 160);
        using var llm = new Llm(EngineHarness.Options(Model, o => { o.NumKvBlocks = 40; o.PinnedPrefixTokenIds = [pinned]; }));
        var engine = llm.Engine;
        Assert.Equal(10, engine.GetStats().KvBlocksPinned);
        llm.Generate([[.. unpinned, 1, 2, 3]], EngineHarness.Greedy(2));

        for (int i = 0; i < 30; i++) llm.Generate([RandomIds(rng, 100)], EngineHarness.Greedy(2)); // the flood
        Assert.True(engine.Blocks.NumEvictions > 0);

        var withPinned = llm.Generate([[.. pinned, 7, 8, 9]], EngineHarness.Greedy(2))[0];
        var withUnpinned = llm.Generate([[.. unpinned, 7, 8, 9]], EngineHarness.Greedy(2))[0];
        Assert.Equal(160, withPinned.NumCachedTokens);
        Assert.Equal(0, withUnpinned.NumCachedTokens);
        engine.Blocks.CheckInvariants(expectAllFree: true);

        Assert.True(engine.Unpin(Assert.Single(engine.PinnedPrefixIds)));
        Assert.Equal(0, engine.GetStats().KvBlocksPinned);
        EngineHarness.AssertNoLeaks(engine);
    }

    [Fact]
    public void A_second_turn_reuses_the_first_turns_prompt_and_reply_blocks()
    {
        var rng = new Random(3);
        var turn1 = RandomIds(rng, 100);
        using var llm = new Llm(EngineHarness.Options(Model));
        var reply = llm.Generate([turn1], EngineHarness.Greedy(20))[0].Outputs[0].TokenIds;
        int[] turn2 = [.. turn1, .. reply, .. RandomIds(rng, 30)];
        var second = llm.Generate([turn2], EngineHarness.Greedy(2))[0];
        // Every token of turn 1 except the last reply token (never fed back) has its K/V cached, in full blocks.
        Assert.Equal((turn1.Length + reply.Count - 1) / 16 * 16, second.NumCachedTokens);
        Assert.True(second.NumCachedTokens > turn1.Length);
        EngineHarness.AssertNoLeaks(llm.Engine);
    }

    [Fact]
    public void Outputs_are_identical_with_every_optimisation_on_and_off()
    {
        var prompts = SharedHeadPrompts(4, 300, 6, 25).Concat(SharedHeadPrompts(5, 200, 5, 40)).ToArray();
        var configs = new (string Name, Action<EngineOptions> Configure)[]
        {
            ("alone, no caching", o => { o.EnablePrefixCaching = false; o.MaxNumSeqs = 1; }),
            ("agent-tuned", o => { }),
            ("plain caching", o => o.UsePlainPrefixCaching()),
            ("no caching", o => o.EnablePrefixCaching = false),
            ("tight", o => { o.NumKvBlocks = 60; o.MaxNumBatchedTokens = 256; }), // chunking, preemption, eviction, deferral at once
        };
        int[][]? reference = null;
        foreach (var (name, configure) in configs)
        {
            using var llm = new Llm(EngineHarness.Options(Model, configure));
            var first = llm.Generate(prompts, EngineHarness.Greedy(8)).Select(o => o.Outputs[0].TokenIds.ToArray()).ToArray();
            var again = llm.Generate(prompts, EngineHarness.Greedy(8)).Select(o => o.Outputs[0].TokenIds.ToArray()).ToArray();
            reference ??= first;
            for (int i = 0; i < prompts.Length; i++)
            {
                Assert.True(reference[i].SequenceEqual(first[i]), $"{name}: prompt {i} differs on the first run");
                Assert.True(reference[i].SequenceEqual(again[i]), $"{name}: prompt {i} differs on the cached run");
            }
            EngineHarness.AssertNoLeaks(llm.Engine);
        }
    }

    [Fact]
    public void Shared_aware_eviction_evicts_private_tails_before_shared_heads()
    {
        foreach (bool sharedAware in new[] { true, false })
        {
            var bm = new BlockManager(numBlocks: 10, blockSize: 4, enablePrefixCaching: true, salt: 1, sharedAwareEviction: sharedAware);
            Sequence Run(string id, int[] tokens)
            {
                var s = new Sequence(id, 0, tokens, new SamplingParams(), 0);
                bm.Allocate(s, bm.FindCachedPrefix(s), tokens.Length);
                s.NumComputedTokens = tokens.Length;
                bm.CacheFullBlocks(s);
                return s;
            }
            int Hits(int[] prefix) => bm.FindCachedPrefix(new Sequence("p", 0, [.. prefix, 0], new SamplingParams(), 0)).Count;
            int[] head = [1, 2, 3, 4, 5, 6, 7, 8];
            int[] privateTail = [200, 201, 202, 203, 204, 205, 206, 207, 208];
            var a = Run("a", [.. head, 10, 11, 12, 13, 99]);
            var b = Run("b", [.. head, 20, 21, 22, 23, 99]); // the head's two blocks are now shared by two sequences
            bm.Free(a);
            bm.Free(b);
            bm.Free(Run("d", privateTail)); // a private conversation, used more recently than the head
            bm.Free(Run("c", [.. Enumerable.Range(100, 30)])); // needs 8 of the 10 blocks: two cached blocks survive
            // Plain LRU keeps the most recent (the private tail); shared-aware eviction keeps the shared head.
            Assert.Equal(sharedAware ? 2 : 0, Hits(head));
            Assert.Equal(sharedAware ? 0 : 2, Hits(privateTail[..8]));
            bm.CheckInvariants(expectAllFree: true);
        }
    }

    [Fact]
    public void Cache_aware_ordering_admits_the_cached_request_first_but_not_forever()
    {
        var rng = new Random(6);
        var cachedHead = RandomIds(rng, 64);
        using var llm = new Llm(EngineHarness.Options(Model, o => o.MaxNumSeqs = 1));
        var engine = llm.Engine;
        llm.Generate([[.. cachedHead, 1]], EngineHarness.Greedy(1));
        var cold = engine.AddRequest(RandomIds(rng, 40), EngineHarness.Greedy(2));
        var warm = engine.AddRequest([.. cachedHead, 5, 6], EngineHarness.Greedy(2));
        var order = new List<string>();
        while (engine.HasUnfinishedRequests)
            foreach (var o in engine.Step()) if (o.Finished) order.Add(o.RequestId);
        Assert.Equal([warm, cold], order);

        // Bounded wait: a cold head-of-line request is passed over at most MaxTimesPassedOver times.
        var starving = engine.AddRequest(RandomIds(rng, 40), EngineHarness.Greedy(1));
        var warmOnes = Enumerable.Range(0, Scheduler.MaxTimesPassedOver + 10).Select(i => engine.AddRequest([.. cachedHead, 9, i + 10], EngineHarness.Greedy(1))).ToList();
        order.Clear();
        while (engine.HasUnfinishedRequests)
            foreach (var o in engine.Step()) if (o.Finished) order.Add(o.RequestId);
        Assert.InRange(order.IndexOf(starving), 1, Scheduler.MaxTimesPassedOver + 1);
        EngineHarness.AssertNoLeaks(engine);
    }
}
