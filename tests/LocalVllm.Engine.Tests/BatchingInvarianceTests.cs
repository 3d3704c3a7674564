using LocalVllm.Engine.Core;

namespace LocalVllm.Engine.Tests;

/// <summary>
/// Greedy tokens are the same whether a request runs alone, in a batch, chunked, preempted and resumed, or with its
/// prefix served from the cache (the reference is each prompt run alone, with every optimisation off).
/// </summary>
[Trait("Category", "Fixtures")]
public sealed class BatchingInvarianceTests
{
    private static IReadOnlyList<int>[] MixedPrompts()
    {
        var cases = Fixtures.Reference("tiny-llama")["cases"]!.AsArray().Select(c => Fixtures.Ints(c!["prompt_ids"])).ToArray();
        var rng = new Random(11);
        // 16 requests: the fixture prompts plus random ones of ragged lengths, some sharing a 40-token head.
        var head = Enumerable.Range(0, 40).Select(_ => rng.Next(3, 512)).ToArray();
        var prompts = new List<IReadOnlyList<int>>(cases);
        for (int i = prompts.Count; i < 16; i++)
        {
            int len = rng.Next(1, 90);
            var tail = Enumerable.Range(0, len).Select(_ => rng.Next(3, 512));
            prompts.Add(i % 3 == 0 ? [.. head, .. tail] : [1, .. tail]);
        }
        return prompts.ToArray();
    }

    private static int[][] RunAlone(IReadOnlyList<int>[] prompts, int maxTokens)
    {
        using var llm = new Llm(EngineHarness.Options("tiny-llama", o => { o.EnablePrefixCaching = false; o.MaxNumSeqs = 1; }));
        return prompts.Select(p => llm.Generate([p], EngineHarness.Greedy(maxTokens))[0].Outputs[0].TokenIds.ToArray()).ToArray();
    }

    private static int[][] RunBatched(IReadOnlyList<int>[] prompts, int maxTokens, Action<EngineOptions> configure, out LlmEngine? engineAfter, out Llm llm)
    {
        llm = new Llm(EngineHarness.Options("tiny-llama", configure));
        engineAfter = llm.Engine;
        return llm.Generate(prompts, EngineHarness.Greedy(maxTokens)).Select(o => o.Outputs[0].TokenIds.ToArray()).ToArray();
    }

    [Fact]
    public void Batched_chunked_preempted_and_cached_runs_equal_unbatched_runs()
    {
        var prompts = MixedPrompts();
        var alone = RunAlone(prompts, 24);

        var configs = new (string Name, Action<EngineOptions> Configure)[]
        {
            ("batch of 16", _ => { }),
            ("chunked prefill", o => o.MaxNumBatchedTokens = 37),
            ("preemption", o => { o.NumKvBlocks = 24; o.BlockSize = 8; o.MaxNumBatchedTokens = 64; }),
            ("block size 1", o => o.BlockSize = 1),
        };
        foreach (var (name, configure) in configs)
        {
            var batched = RunBatched(prompts, 24, configure, out var engine, out var llm);
            using (llm)
            {
                for (int i = 0; i < prompts.Length; i++) Assert.True(alone[i].SequenceEqual(batched[i]), $"{name}: prompt {i} differs");
                EngineHarness.AssertNoLeaks(engine!);
                if (name == "preemption") Assert.True(engine!.Scheduler.NumPreemptions > 0, "the small cache should have forced preemption");
            }
        }
    }

    [Fact]
    public void A_second_run_is_served_from_the_prefix_cache_with_the_same_tokens()
    {
        var prompts = MixedPrompts();
        var alone = RunAlone(prompts, 16);
        using var llm = new Llm(EngineHarness.Options("tiny-llama"));
        var first = llm.Generate(prompts, EngineHarness.Greedy(16));
        long prefillAfterFirst = llm.Engine.Counters.PrefillTokens;
        var second = llm.Generate(prompts, EngineHarness.Greedy(16));
        for (int i = 0; i < prompts.Length; i++)
        {
            Assert.Equal(alone[i], first[i].Outputs[0].TokenIds);
            Assert.Equal(alone[i], second[i].Outputs[0].TokenIds);
        }
        Assert.Contains(second, o => o.NumCachedTokens > 0);
        foreach (var o in second)
            Assert.Equal((o.PromptTokenIds.Count - 1) / 16 * 16, o.NumCachedTokens);
        long computedSecond = llm.Engine.Counters.PrefillTokens - prefillAfterFirst;
        Assert.Equal(second.Sum(o => o.PromptTokenIds.Count - o.NumCachedTokens), computedSecond);
        EngineHarness.AssertNoLeaks(llm.Engine);
        llm.Engine.Blocks.CheckInvariants(expectAllFree: true);
        Assert.True(llm.Engine.Blocks.NumCachedFreeBlocks > 0);
    }

    [Fact]
    public void Counters_since_a_snapshot_cover_only_the_later_work()
    {
        var prompts = MixedPrompts().Take(2).ToArray();
        using var llm = new Llm(EngineHarness.Options("tiny-llama"));
        llm.Generate(prompts, EngineHarness.Greedy(4));
        var snapshot = llm.Engine.Counters.Snapshot();
        long stepsBefore = llm.Engine.Counters.Steps;
        llm.Generate(prompts, EngineHarness.Greedy(6));
        long later = llm.Engine.Counters.Steps - stepsBefore;
        // Both prompts fit the token budget: one step prefills them and samples each one's first token, and every
        // further token is one decode step, so a run of M tokens takes exactly M steps.
        Assert.True(prompts.Sum(p => p.Count) <= new EngineOptions().MaxNumBatchedTokens);
        Assert.Equal(4, stepsBefore);
        Assert.Equal(6, later);
        Assert.StartsWith($"steps {later}:", llm.Engine.Counters.TimeSplit(snapshot));
        Assert.StartsWith($"steps {stepsBefore + later}:", llm.Engine.Counters.TimeSplit());
        Assert.Equal(stepsBefore, snapshot.Steps); // the snapshot did not move with the engine
    }

    [Fact]
    public void Each_steps_output_ids_are_a_snapshot_that_later_tokens_do_not_change()
    {
        var prompts = MixedPrompts().Take(3).ToArray();
        var alone = RunAlone(prompts, 40); // 40 tokens: the output buffer grows (16 -> 32 -> 64) while snapshots live
        using var llm = new Llm(EngineHarness.Options("tiny-llama"));
        var ids = prompts.Select(p => llm.Engine.AddRequest(p, EngineHarness.Greedy(40))).ToList();
        var seen = new List<(int Request, IReadOnlyList<int> Tokens, int[] Copy)>();
        while (llm.Engine.HasUnfinishedRequests)
            foreach (var o in llm.Engine.Step())
                seen.Add((ids.IndexOf(o.RequestId), o.Outputs[0].TokenIds, o.Outputs[0].TokenIds.ToArray()));
        Assert.Equal(3 * 40, seen.Count);
        foreach (var (request, tokens, copy) in seen)
        {
            Assert.Equal(copy, tokens); // unchanged by everything generated after it
            Assert.Equal(alone[request].Take(copy.Length), copy); // and a prefix of the final output
        }
    }

    [Fact]
    public void Seeded_sampling_is_reproducible_across_batches_and_n_completions_differ()
    {
        using var llm = new Llm(EngineHarness.Options("tiny-llama"));
        var seeded = new SamplingParams { Temperature = 0.8f, TopK = 50, TopP = 0.9f, Seed = 1234, MaxTokens = 12, IgnoreEos = true };
        int[] prompt = [1, 17, 42, 99, 7];
        var alone = llm.Generate([prompt], seeded)[0].Outputs[0].TokenIds;
        var others = MixedPrompts().Take(7).ToList();
        others.Insert(3, prompt);
        var seededInBatch = llm.Generate(others, seeded)[3].Outputs[0].TokenIds;
        Assert.Equal(alone, seededInBatch);

        var n = llm.Generate([prompt], seeded with { N = 3 })[0];
        Assert.Equal(3, n.Outputs.Count);
        Assert.Equal(alone, n.Outputs[0].TokenIds); // completion 0 uses the request seed
        Assert.NotEqual(n.Outputs[1].TokenIds, n.Outputs[2].TokenIds);
        EngineHarness.AssertNoLeaks(llm.Engine);
    }

    [Fact]
    public void N_completions_compute_the_prompts_full_blocks_once_and_each_equals_a_run_alone()
    {
        var prompt = MixedPrompts().First(p => p.Count >= 40).Take(40).ToArray(); // two full blocks of 16 and 8 tokens
        var alone = RunAlone([prompt], 10)[0];
        using var llm = new Llm(EngineHarness.Options("tiny-llama"));
        var output = llm.Generate([prompt], EngineHarness.Greedy(10) with { N = 3 })[0];
        Assert.Equal(3, output.Outputs.Count);
        foreach (var completion in output.Outputs) Assert.Equal(alone, completion.TokenIds);
        // The first completion computes all 40 prompt tokens; its siblings wait one step for the two full blocks and
        // then compute only the 8-token tail: 40 + 2 * 8, not 3 * 40.
        Assert.Equal(40 + 2 * 8, llm.Engine.Counters.PrefillTokens);
        Assert.Equal(2 * 32, llm.Engine.Scheduler.CachedPromptTokens);
        EngineHarness.AssertNoLeaks(llm.Engine);
    }

    [Fact]
    public void Abort_frees_blocks_while_other_requests_continue()
    {
        using var llm = new Llm(EngineHarness.Options("tiny-llama"));
        var engine = llm.Engine;
        var keep = engine.AddRequest([1, 2, 3, 4], EngineHarness.Greedy(20));
        var drop = engine.AddRequest(Enumerable.Range(3, 70).ToArray(), EngineHarness.Greedy(20));
        engine.Step();
        engine.Step();
        Assert.True(engine.Blocks.NumUsedBlocks > 0);
        var aborted = engine.Abort(drop)!;
        Assert.Equal(FinishReasons.Abort, aborted.Outputs[0].FinishReason);
        RequestOutput? final = null;
        while (engine.HasUnfinishedRequests)
            foreach (var o in engine.Step()) if (o.Finished) final = o;
        Assert.Equal(keep, final!.RequestId);
        using var alone = new Llm(EngineHarness.Options("tiny-llama"));
        Assert.Equal(alone.Generate([[1, 2, 3, 4]], EngineHarness.Greedy(20))[0].Outputs[0].TokenIds, final.Outputs[0].TokenIds);
        EngineHarness.AssertNoLeaks(engine);
    }
}
