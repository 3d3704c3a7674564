using LocalVllm.Engine.Core;

namespace LocalVllm.Engine.Tests;

/// <summary>
/// vLLM's priority scheduling (<c>--scheduling-policy priority</c> and a request's <c>priority</c>): waiting requests
/// are admitted by (priority, arrival) and the running request preempted when blocks run out is the last in that
/// order; first-come-first-served is unchanged. Outputs stay the plain greedy continuation whatever the order.
/// </summary>
public sealed class PrioritySchedulingTests
{
    private static readonly System.Text.Json.Nodes.JsonNode Case = Fixtures.Reference("stories260K")["cases"]![0]!;

    private static List<string> RunToEnd(LlmEngine engine, Dictionary<string, IReadOnlyList<int>> tokens)
    {
        var finished = new List<string>();
        while (engine.HasUnfinishedRequests)
            foreach (var o in engine.Step())
                if (o.Finished)
                {
                    finished.Add(o.RequestId);
                    tokens[o.RequestId] = o.Outputs[0].TokenIds;
                }
        return finished;
    }

    [Theory]
    [InlineData("fcfs")]
    [InlineData("priority")]
    public void Waiting_requests_are_admitted_by_priority_then_arrival(string policy)
    {
        using var llm = new Llm(EngineHarness.Options("stories260K", o => { o.MaxNumSeqs = 1; o.SchedulingPolicy = policy; }));
        var engine = llm.Engine;
        var prompt = engine.EncodePrompt(Case["text"]!.GetValue<string>());
        int[] priorities = policy == "priority" ? [1, 0, 1, -1] : [0, 0, 0, 0];
        var ids = priorities.Select((p, i) => engine.AddRequest(prompt, EngineHarness.Greedy(3) with { Priority = p }, requestId: $"r{i}")).ToArray();
        var tokens = new Dictionary<string, IReadOnlyList<int>>();
        var order = RunToEnd(engine, tokens);
        Assert.Equal(policy == "priority" ? ["r3", "r1", "r0", "r2"] : ["r0", "r1", "r2", "r3"], order);
        var greedy = Fixtures.Ints(Case["greedy_ids"])[..3];
        Assert.All(ids, id => Assert.Equal(greedy, tokens[id]));
        EngineHarness.AssertNoLeaks(engine);
    }

    /// <summary>
    /// Two long generations that cannot both fit: the one that came first ("early") and, some steps later, "late". First
    /// come first served preempts the latest admitted (late); by priority, with late more urgent, early is preempted
    /// even though it was scheduled ahead of late in the same step (its work for the step is undone). Either way both
    /// end with llama2.c's greedy continuation and every block is free after.
    /// </summary>
    [Theory]
    [InlineData("fcfs", 2)]
    [InlineData("priority", 2)]
    [InlineData("fcfs", 9)]
    [InlineData("priority", 9)]
    public void Blocks_running_out_preempt_the_latest_or_the_least_urgent(string policy, int head)
    {
        var greedy = Fixtures.Ints(Case["greedy_ids"]);
        int maxTokens = greedy.Length - 4;
        using var llm = new Llm(EngineHarness.Options("stories260K", o => { o.NumKvBlocks = 12; o.BlockSize = 8; o.SchedulingPolicy = policy; }));
        var engine = llm.Engine;
        var prompt = engine.EncodePrompt(Case["text"]!.GetValue<string>());
        bool byPriority = policy == "priority";
        engine.AddRequest(prompt, EngineHarness.Greedy(maxTokens) with { Priority = byPriority ? 1 : 0 }, requestId: "early");
        var tokens = new Dictionary<string, IReadOnlyList<int>>();
        for (int i = 0; i < head; i++) engine.Step();
        engine.AddRequest(prompt, EngineHarness.Greedy(maxTokens), requestId: "late");
        var order = RunToEnd(engine, tokens);

        Assert.True(engine.Scheduler.NumPreemptions > 0);
        // Nine steps ahead, both cross block boundaries in the same steps: late finds no block after early took the
        // last one in the same step, so early's work for that step is undone (the path that differs from FCFS).
        if (byPriority && head == 9) Assert.True(engine.Scheduler.NumPreemptedAfterScheduling > 0);
        Assert.Equal(byPriority ? ["late", "early"] : ["early", "late"], order);
        Assert.Equal(greedy[..maxTokens], tokens["early"]);
        Assert.Equal(greedy[..maxTokens], tokens["late"]);
        EngineHarness.AssertNoLeaks(engine);
    }

    /// <summary>
    /// Every slot taken (MaxNumSeqs 1) by a long background request: by priority, a more urgent arrival displaces it at
    /// once (it goes back to wait and is recomputed), while a peer of equal priority waits its turn; first come first
    /// served, both wait. Tokens are the greedy reference's either way.
    /// </summary>
    [Theory]
    [InlineData("fcfs")]
    [InlineData("priority")]
    public void A_more_urgent_request_takes_a_full_engines_slot_from_the_least_urgent_one(string policy)
    {
        var greedy = Fixtures.Ints(Case["greedy_ids"]);
        using var llm = new Llm(EngineHarness.Options("stories260K", o => { o.MaxNumSeqs = 1; o.SchedulingPolicy = policy; }));
        var engine = llm.Engine;
        var prompt = engine.EncodePrompt(Case["text"]!.GetValue<string>());
        bool byPriority = policy == "priority";
        engine.AddRequest(prompt, EngineHarness.Greedy(40) with { Priority = byPriority ? 1 : 0 }, requestId: "background");
        for (int i = 0; i < 3; i++) engine.Step();
        engine.AddRequest(prompt, EngineHarness.Greedy(40) with { Priority = byPriority ? 1 : 0 }, requestId: "peer");
        engine.AddRequest(prompt, EngineHarness.Greedy(5), requestId: "urgent");
        var tokens = new Dictionary<string, IReadOnlyList<int>>();
        var order = RunToEnd(engine, tokens);

        Assert.Equal(byPriority ? ["urgent", "background", "peer"] : ["background", "peer", "urgent"], order);
        Assert.Equal(byPriority ? 1 : 0, engine.Scheduler.NumPreemptions); // only the urgent one displaces anybody
        Assert.Equal(greedy[..40], tokens["background"]);
        Assert.Equal(greedy[..40], tokens["peer"]);
        Assert.Equal(greedy[..5], tokens["urgent"]);
        EngineHarness.AssertNoLeaks(engine);
    }

    /// <summary>
    /// The urgent request shares the prompt the running one is still prefilling (chunks of 64 tokens: its last 38 leave
    /// room in the step's budget): it waits for the shared blocks instead of displacing the request computing them
    /// (which would leave the only slot empty, and the step with nothing to run), then displaces it; both end with the
    /// prompt's greedy continuation.
    /// </summary>
    [Fact]
    public void A_more_urgent_request_waiting_for_a_shared_head_does_not_empty_the_slot()
    {
        var c = Fixtures.Reference("stories260K")["cases"]!.AsArray().First(x => x!["name"]!.GetValue<string>() == "long_100")!;
        var prompt = Fixtures.Ints(c["prompt_ids"]);
        var greedy = Fixtures.Ints(c["greedy_ids"])[..12];
        using var llm = new Llm(EngineHarness.Options("stories260K", o => { o.MaxNumSeqs = 1; o.MaxNumBatchedTokens = 64; o.SchedulingPolicy = "priority"; }));
        var engine = llm.Engine;
        engine.AddRequest(prompt, EngineHarness.Greedy(12) with { Priority = 1 }, requestId: "background");
        engine.Step(); // the first 64 of its 102 prompt tokens
        engine.AddRequest(prompt, EngineHarness.Greedy(12), requestId: "urgent");
        var tokens = new Dictionary<string, IReadOnlyList<int>>();
        var order = RunToEnd(engine, tokens);
        Assert.Equal(["urgent", "background"], order);
        Assert.Equal(greedy, tokens["urgent"]);
        Assert.Equal(greedy, tokens["background"]);
        Assert.True(engine.Scheduler.NumDeferredForSharedPrefix > 0);
        EngineHarness.AssertNoLeaks(engine);
    }

    [Fact]
    public void A_priority_without_priority_scheduling_or_an_unknown_policy_is_refused_by_name()
    {
        using var llm = new Llm(EngineHarness.Options("stories260K"));
        var e = Assert.Throws<ArgumentException>(() => llm.Generate(["Once"], EngineHarness.Greedy(2) with { Priority = 2 }));
        Assert.Contains("SchedulingPolicy", e.Message);
        Assert.Contains("Unknown scheduling policy 'lifo'", Assert.Throws<ArgumentException>(() =>
            new Llm(EngineHarness.Options("stories260K", o => o.SchedulingPolicy = "lifo"))).Message);
    }
}
