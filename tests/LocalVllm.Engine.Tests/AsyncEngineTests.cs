using LocalVllm.Engine.Text.Templating;

namespace LocalVllm.Engine.Tests;

/// <summary>The background engine loop: concurrent streams, cancellation, disposal, stats.</summary>
public sealed class AsyncEngineTests
{
    private static readonly int[][] Prompts =
        Fixtures.Reference("tiny-llama")["cases"]!.AsArray().Select(c => Fixtures.Ints(c!["prompt_ids"])).ToArray();

    private static async Task AssertNoLeaksAsync(AsyncLlmEngine engine) =>
        await engine.InvokeAsync(EngineHarness.AssertNoLeaks);

    [Fact]
    public async Task Concurrent_streams_equal_the_reference_greedy_ids_and_deltas_add_up()
    {
        using var engine = new AsyncLlmEngine(EngineHarness.Options("tiny-llama"));
        var expected = Fixtures.Reference("tiny-llama")["cases"]!.AsArray().Select(c => Fixtures.Ints(c!["greedy_ids"])).ToArray();
        var tasks = Prompts.Select(async (p, i) =>
        {
            var seen = new List<int>();
            RequestOutput? last = null;
            await foreach (var o in engine.GenerateAsync(p, EngineHarness.Greedy(expected[i].Length)))
            {
                Assert.True(o.Outputs[0].TokenIds.Count > seen.Count);
                seen = [.. o.Outputs[0].TokenIds];
                last = o;
            }
            return last!;
        }).ToArray();
        var results = await Task.WhenAll(tasks);
        for (int i = 0; i < results.Length; i++) Assert.Equal(expected[i], results[i].Outputs[0].TokenIds);
        Assert.True(engine.Stats.DecodeTokens > 0);
        Assert.All(results, r => Assert.True(r.TimeToFirstTokenSeconds > 0 && r.TimePerOutputTokenSeconds > 0));
        await AssertNoLeaksAsync(engine);
    }

    [Fact]
    public async Task WhenIdle_completes_once_an_abandoned_stream_has_been_aborted_and_at_once_when_idle()
    {
        using var engine = new AsyncLlmEngine(EngineHarness.Options("tiny-llama"));
        await engine.WhenIdleAsync(); // nothing submitted: idle already
        using var cts = new CancellationTokenSource();
        var stream = engine.GenerateAsync(Prompts[0], EngineHarness.Greedy(400), cancellationToken: cts.Token).GetAsyncEnumerator(cts.Token);
        Assert.True(await stream.MoveNextAsync()); // the request is running
        var idle = engine.WhenIdleAsync();
        Assert.False(idle.IsCompleted); // 400 tokens are far from done
        cts.Cancel();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(async () => { while (await stream.MoveNextAsync()) { } });
        await stream.DisposeAsync();
        // A hang guard, not a timing: a regression shows as a failure naming the wait instead of a stuck test run.
        await idle.WaitAsync(TimeSpan.FromMinutes(2));
        await engine.InvokeAsync(e => Assert.False(e.HasUnfinishedRequests));
        await AssertNoLeaksAsync(engine);
    }

    [Fact]
    public async Task Cancelling_a_stream_aborts_the_request_and_frees_its_blocks()
    {
        using var engine = new AsyncLlmEngine(EngineHarness.Options("tiny-llama"));
        using var cts = new CancellationTokenSource();
        int received = 0;
        var other = engine.GenerateFinalAsync(Prompts[1], EngineHarness.Greedy(40));
        await Assert.ThrowsAnyAsync<OperationCanceledException>(async () =>
        {
            await foreach (var _ in engine.GenerateAsync(Prompts[2], EngineHarness.Greedy(350), cancellationToken: cts.Token))
                if (++received == 3) cts.Cancel();
        });
        // Leaving an enumeration early aborts too.
        await foreach (var _ in engine.GenerateAsync(Prompts[3], EngineHarness.Greedy(350))) break;
        Assert.Equal(40, (await other).Outputs[0].TokenIds.Count);
        await AssertNoLeaksAsync(engine);
    }

    [Fact]
    public async Task Invalid_requests_throw_at_once_and_the_engine_keeps_serving()
    {
        using var engine = new AsyncLlmEngine(EngineHarness.Options("tiny-llama"));
        await Assert.ThrowsAnyAsync<ArgumentException>(async () =>
        {
            await foreach (var _ in engine.GenerateAsync([1, 2], new SamplingParams { Temperature = -1 })) { }
        });
        var ok = await engine.GenerateFinalAsync([1, 2], EngineHarness.Greedy(3));
        Assert.Equal(3, ok.Outputs[0].TokenIds.Count);
    }

    [Fact]
    public async Task Disposing_while_requests_run_ends_them_promptly()
    {
        // tiny-qwen3-chat with an 8 MiB cache (16,384 tokens, its context lowered to that): 16,000 tokens cannot finish
        // on their own before Dispose.
        var engine = new AsyncLlmEngine(EngineHarness.Options("tiny-qwen3-chat"));
        var started = new TaskCompletionSource();
        var running = Task.Run(async () =>
        {
            await foreach (var _ in engine.GenerateAsync([5, 6, 7], EngineHarness.Greedy(16000))) started.TrySetResult();
        });
        await started.Task.WaitAsync(TimeSpan.FromSeconds(30));
        engine.Dispose();
        var e = await Record.ExceptionAsync(() => running.WaitAsync(TimeSpan.FromSeconds(30)));
        Assert.True(e is ObjectDisposedException or OperationCanceledException, e?.ToString() ?? "the request completed instead of being ended");
    }
}
