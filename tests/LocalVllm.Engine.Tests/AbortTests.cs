using LocalVllm.Engine.Core;
using LocalVllm.Engine.Execution;

namespace LocalVllm.Engine.Tests;

/// <summary>
/// Aborts in every state free exactly the blocks the request held: waiting, running, preempted, and a request with
/// three completions in different states. The scheduler is stepped by hand (every sampling sequence "samples" token 5),
/// so the states and counts are exact and no forward pass runs.
/// </summary>
public sealed class AbortTests
{
    [Fact]
    public void Aborting_waiting_running_preempted_and_n3_requests_frees_exactly_their_blocks()
    {
        using var llm = new Llm(EngineHarness.Options("tiny-llama", o => { o.NumKvBlocks = 10; o.EnablePrefixCaching = false; }));
        var engine = llm.Engine;
        var scheduler = engine.Scheduler;
        void StepByHand()
        {
            var batch = scheduler.Schedule();
            scheduler.Update(batch, batch.Select(b => b.Sequence.SamplesAfter(b.NumNewTokens) ? new SampledToken(5, null) : (SampledToken?)null).ToArray());
        }
        IReadOnlyList<Sequence> Of(string id) => [.. scheduler.Unfinished.Where(q => q.RequestId == id)];
        int[] Prompt(int n) => [.. Enumerable.Range(0, n).Select(i => 3 + i % 400)];

        var r1 = engine.AddRequest(Prompt(40), EngineHarness.Greedy(100));      // 3 blocks
        var r2 = engine.AddRequest(Prompt(40), EngineHarness.Greedy(100));      // 3 blocks
        var n3 = engine.AddRequest(Prompt(20), EngineHarness.Greedy(100) with { N = 3 }); // 2 blocks each
        var waiting = engine.AddRequest(Prompt(100), EngineHarness.Greedy(10)); // 7 blocks: never fits beside the others

        // Step 1 admits r1, r2 and two of n3's completions: all 10 blocks. Decoding then grows r1 past 48 tokens, which
        // needs an 11th block: the newest running sequence (n3's second completion) is preempted.
        StepByHand();
        Assert.Equal(0, engine.Blocks.NumFreeBlocks);
        while (scheduler.NumPreemptions == 0) StepByHand();
        Assert.Equal(1, scheduler.NumPreemptions);
        var n3Seqs = Of(n3);
        Assert.Equal([SequenceStatus.Running, SequenceStatus.Waiting, SequenceStatus.Waiting], n3Seqs.Select(q => q.Status));
        Assert.True(n3Seqs[1].NumOutputTokens > 0 && n3Seqs[1].BlockTable.Count == 0, "n3's second completion was preempted");
        Assert.Equal(0, n3Seqs[2].NumOutputTokens); // its third never ran
        engine.Blocks.CheckInvariants(scheduler.Unfinished);

        void AbortFreesExactly(string id)
        {
            int held = Of(id).Sum(q => q.BlockTable.Count), free = engine.Blocks.NumFreeBlocks;
            var final = engine.Abort(id)!;
            Assert.All(final.Outputs, o => Assert.Equal(FinishReasons.Abort, o.FinishReason));
            Assert.Equal(free + held, engine.Blocks.NumFreeBlocks);
            Assert.Empty(Of(id));
            engine.Blocks.CheckInvariants(scheduler.Unfinished);
        }
        AbortFreesExactly(waiting);  // waiting, held nothing
        AbortFreesExactly(r2);       // running
        AbortFreesExactly(n3);       // one running, one preempted, one waiting
        AbortFreesExactly(r1);       // running, the last one
        Assert.Null(engine.Abort(r1)); // twice: unknown by now
        EngineHarness.AssertNoLeaks(engine);
    }

    [Fact]
    public void The_waiting_bound_refuses_exactly_the_requests_beyond_it()
    {
        using var llm = new Llm(EngineHarness.Options("tiny-llama", o => o.MaxWaitingRequests = 5));
        var engine = llm.Engine;
        for (int i = 0; i < 4; i++) engine.AddRequest([1, 2, 3], EngineHarness.Greedy(2));
        var two = EngineHarness.Greedy(2) with { N = 2 };
        var e = Assert.Throws<EngineOverloadedException>(() => engine.AddRequest([1, 2, 3], two)); // 4 + 2 > 5
        Assert.Contains("4 waiting, MaxWaitingRequests = 5", e.Message);
        engine.AddRequest([1, 2, 3], EngineHarness.Greedy(2)); // 4 + 1 = 5: accepted
        Assert.Throws<EngineOverloadedException>(() => engine.AddRequest([1, 2, 3], EngineHarness.Greedy(2)));
        Assert.Equal(5, engine.Scheduler.NumWaiting);
        while (engine.HasUnfinishedRequests) engine.Step();
        EngineHarness.AssertNoLeaks(engine);
    }
}

/// <summary>The shared dispose-time check (tests/Shared/EngineInvariantChecks.cs) is armed and catches a leak.</summary>
public sealed class InvariantCheckTests
{
    [Fact]
    public void Disposing_an_engine_that_leaked_a_block_fails()
    {
        var engine = new LlmEngine(EngineHarness.Options("tiny-llama", o => o.NumKvBlocks = 8));
        // A sequence the scheduler does not know holds two blocks: a leak as far as the engine can tell.
        var stray = new Sequence("stray", 0, [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], EngineHarness.Greedy(1), 0);
        engine.Blocks.Allocate(stray, [], stray.NumTokens);
        int before = LocalVllm.TestSupport.EngineInvariantChecks.Checked;
        var e = Assert.Throws<InvalidOperationException>(engine.Dispose);
        Assert.Contains("holders", e.Message);
        engine.Blocks.Free(stray);
        engine.Dispose();
        Assert.True(LocalVllm.TestSupport.EngineInvariantChecks.Checked > before, "the check ran on the clean dispose");
    }
}
