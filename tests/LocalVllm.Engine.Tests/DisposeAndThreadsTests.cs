namespace LocalVllm.Engine.Tests;

/// <summary>
/// Disposing while work is queued or running never leaves a caller waiting, and the offline API is safe across
/// threads: concurrent <c>Generate</c> calls give every request the greedy ids it gets alone; a dispose during a
/// <c>Generate</c> makes it throw <see cref="ObjectDisposedException"/> and frees the model only afterwards.
/// </summary>
public sealed class DisposeAndThreadsTests
{
    private static readonly int[][] Prompts =
        Fixtures.Reference("tiny-llama")["cases"]!.AsArray().Select(c => Fixtures.Ints(c!["prompt_ids"])).ToArray();

    private static readonly TimeSpan Patience = TimeSpan.FromSeconds(60);

    [Fact]
    public async Task Dispose_answers_every_command_queued_behind_a_busy_step()
    {
        var engine = new AsyncLlmEngine(EngineHarness.Options("tiny-llama"));
        var busy = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var release = new ManualResetEventSlim();
        // The stop condition runs inside the engine step, on the loop thread: while it waits, the loop is mid-step, and
        // after the step it sees the stop and leaves without reading the commands queued meanwhile (the drain's case).
        var running = Task.Run(async () =>
        {
            await foreach (var _ in engine.GenerateAsync(Prompts[0], EngineHarness.Greedy(50) with
            {
                StopCondition = _ => { busy.TrySetResult(); release.Wait(); return false; },
            })) { }
        });
        await busy.Task.WaitAsync(Patience);

        var stream = Task.Run(async () =>
        {
            await foreach (var _ in engine.GenerateAsync(Prompts[1], EngineHarness.Greedy(50))) { }
        });
        var queuedCall = engine.InvokeAsync(_ => { });
        var disposing = Task.Run(engine.Dispose);
        while (!disposing.IsCompleted && !IsDisposeStarted(engine)) await Task.Yield();
        release.Set();

        await disposing.WaitAsync(Patience);
        // Each request and call completed: it ran, or ended with ObjectDisposedException; none is left waiting.
        foreach (var (name, task) in new[] { ("running", running), ("queued stream", stream), ("queued call", queuedCall) })
        {
            var error = await Record.ExceptionAsync(() => task.WaitAsync(Patience));
            Assert.True(error is null or ObjectDisposedException, $"{name} ended with {error}");
        }

        // After dispose, new work is refused at once.
        Assert.Throws<ObjectDisposedException>(() => { _ = engine.InvokeAsync(_ => { }); }); // thrown at once, not through the task
        await Assert.ThrowsAsync<ObjectDisposedException>(async () =>
        {
            await foreach (var _ in engine.GenerateAsync(Prompts[0], EngineHarness.Greedy(2))) { }
        });
    }

    private static bool IsDisposeStarted(AsyncLlmEngine engine)
    {
        try
        {
            engine.Abort("probe"); // a no-op that still works until dispose begins
            return engine.InvokeAsync(_ => { }) is { IsFaulted: true };
        }
        catch (ObjectDisposedException)
        {
            return true;
        }
    }

    [Fact]
    public async Task Dispose_racing_many_callers_leaves_none_waiting()
    {
        var rng = new Random(5);
        for (int round = 0; round < 12; round++)
        {
            var engine = new AsyncLlmEngine(EngineHarness.Options("tiny-llama"));
            // Dispose after a random number (0-99) of the callers' events (calls done, outputs streamed): at a random
            // point of their work, ordered by the events themselves rather than by a delay.
            int threshold = rng.Next(0, 100), events = 0;
            var reached = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            void Event()
            {
                if (Interlocked.Increment(ref events) >= threshold) reached.TrySetResult();
            }
            if (threshold == 0) reached.TrySetResult();
            var callers = Enumerable.Range(0, 24).Select(i => Task.Run(async () =>
            {
                if (i % 3 == 0)
                    for (int k = 0; k < 20; k++)
                    {
                        await engine.InvokeAsync(e => _ = e.GetStats());
                        Event();
                    }
                else
                    await foreach (var _ in engine.GenerateAsync(Prompts[i % Prompts.Length], EngineHarness.Greedy(8 + i))) Event();
            })).ToArray();
            await reached.Task.WaitAsync(Patience); // eight callers make 20 calls each: 160 events, more than any threshold
            engine.Dispose();
            foreach (var caller in callers)
            {
                var error = await Record.ExceptionAsync(() => caller.WaitAsync(Patience));
                Assert.True(error is null or ObjectDisposedException, $"round {round}: a caller ended with {error}");
            }
        }
    }

    [Theory]
    [InlineData(2)]
    [InlineData(8)]
    public void Concurrent_Generate_calls_give_each_request_its_greedy_ids_alone(int threads)
    {
        using var llm = new Llm(EngineHarness.Options("tiny-llama"));
        var expected = Fixtures.Reference("tiny-llama")["cases"]!.AsArray().Select(c => Fixtures.Ints(c!["greedy_ids"])).ToArray();
        var results = new IReadOnlyList<RequestOutput>[threads];
        var start = new Barrier(threads);
        var workers = Enumerable.Range(0, threads).Select(t => new Thread(() =>
        {
            start.SignalAndWait();
            int i = t % Prompts.Length;
            results[t] = llm.Generate([Prompts[i]], EngineHarness.Greedy(expected[i].Length));
        })).ToArray();
        foreach (var w in workers) w.Start();
        foreach (var w in workers) Assert.True(w.Join(Patience));
        for (int t = 0; t < threads; t++) Assert.Equal(expected[t % Prompts.Length], results[t][0].Outputs[0].TokenIds);
        // The engine is intact afterwards: a single-threaded call gives the reference again.
        Assert.Equal(expected[0], llm.Generate([Prompts[0]], EngineHarness.Greedy(expected[0].Length))[0].Outputs[0].TokenIds);
        EngineHarness.AssertNoLeaks(llm.Engine);
    }

    [Fact]
    public void Dispose_during_Generate_makes_it_throw_ObjectDisposedException()
    {
        var llm = new Llm(EngineHarness.Options("tiny-llama"));
        var generating = new ManualResetEventSlim();
        Exception? error = null;
        var worker = new Thread(() =>
        {
            try
            {
                // The stop condition runs after every token: the first one tells the test that generation is under way.
                llm.Generate([Prompts[0]], EngineHarness.Greedy(400) with { StopCondition = _ => { generating.Set(); return false; } });
            }
            catch (Exception e)
            {
                error = e;
            }
        });
        worker.Start();
        Assert.True(generating.Wait(Patience));
        llm.Dispose();
        Assert.True(worker.Join(Patience));
        Assert.IsType<ObjectDisposedException>(error);
        Assert.Throws<ObjectDisposedException>(() => llm.Generate([Prompts[0]], EngineHarness.Greedy(2)));
    }
}
