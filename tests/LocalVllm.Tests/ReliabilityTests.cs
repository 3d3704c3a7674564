using System.Diagnostics;
using System.Text.Json;
using LocalVllm.Engine;
using LocalVllm.Engine.Attention;
using LocalVllm.Engine.Text.Templating;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.Logging;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace LocalVllm.Tests;

/// <summary>Bad input, overload, cancellation storms and faults: every caller gets an answer, nothing leaks.</summary>
public sealed class ReliabilityTests(ITestOutputHelper output)
{
    private static string ModelDir => Fixtures.Model("tiny-qwen3-chat");
    private static readonly ChatOptions Greedy = new() { Temperature = 0, MaxOutputTokens = 8, AdditionalProperties = new() { ["enable_thinking"] = false, ["ignore_eos"] = true } };

    private static async Task AssertHealthyAsync(LocalVllmEngine engine, IChatClient client, string? expectedText = null)
    {
        var r = await client.GetResponseAsync([new ChatMessage(ChatRole.User, "Are you still there?")], Greedy);
        Assert.Equal(8, r.Usage!.OutputTokenCount);
        if (expectedText is not null) Assert.Equal(expectedText, r.Text);
        await engine.Engine.InvokeAsync(e =>
        {
            Assert.False(e.HasUnfinishedRequests);
            e.Blocks.CheckInvariants(expectAllFree: true);
        });
    }

    [Fact]
    public async Task Bad_chat_input_gets_a_clear_error_naming_the_value_and_the_engine_keeps_serving()
    {
        var logs = new ListLogger();
        using var engine = new LocalVllmEngine(new EngineOptions { Model = ModelDir, KvCacheMemoryBytes = 4L << 20, MaxModelLen = 256 }, logger: logs);
        var client = new LocalVllmChatClient(engine, logs);
        var healthy = (await client.GetResponseAsync([new ChatMessage(ChatRole.User, "Are you still there?")], Greedy)).Text;

        async Task<Exception> Fails(IEnumerable<ChatMessage> messages, ChatOptions? options = null) =>
            await Assert.ThrowsAnyAsync<Exception>(() => client.GetResponseAsync(messages, options ?? Greedy));

        Assert.Contains("empty", (await Fails([])).Message);
        var overlong = await Fails([new ChatMessage(ChatRole.User, string.Join(" ", Enumerable.Repeat("word", 400)))]);
        Assert.Contains("256", overlong.Message);
        Assert.Contains("context length", overlong.Message);
        Assert.Contains("Temperature", (await Fails([new ChatMessage(ChatRole.User, "hi")], new ChatOptions { Temperature = -0.1f })).Message);
        Assert.Contains("TopP", (await Fails([new ChatMessage(ChatRole.User, "hi")], new ChatOptions { TopP = 0 })).Message);
        Assert.Contains("MaxOutputTokens", (await Fails([new ChatMessage(ChatRole.User, "hi")], new ChatOptions { MaxOutputTokens = 0 })).Message);
        Assert.Contains("gpt-4o", (await Fails([new ChatMessage(ChatRole.User, "hi")], new ChatOptions { ModelId = "gpt-4o" })).Message);
        using var badSchema = JsonDocument.Parse("[1, 2]");
        var tool = AIFunctionFactory.CreateDeclaration("broken", "a tool with a bad schema", badSchema.RootElement.Clone());
        Assert.Contains("broken", (await Fails([new ChatMessage(ChatRole.User, "hi")], new ChatOptions { Tools = [tool] })).Message);
        Assert.Contains("call_x", (await Fails([new ChatMessage(ChatRole.User, "hi"), new ChatMessage(ChatRole.Tool, [new FunctionResultContent("call_x", "r")])])).Message);

        await AssertHealthyAsync(engine, client, healthy);
        Assert.Contains(logs.Entries, e => e.Level == LogLevel.Warning && e.Message.Contains("rejected") && e.Message.Contains("context length"));
    }

    [Fact]
    public async Task A_prompt_larger_than_the_whole_kv_cache_is_rejected_with_the_limit()
    {
        using var engine = new LocalVllmEngine(new EngineOptions { Model = ModelDir, NumKvBlocks = 4 });
        var client = new LocalVllmChatClient(engine);
        var e = await Assert.ThrowsAnyAsync<ArgumentException>(() => client.GetResponseAsync([new ChatMessage(ChatRole.User, string.Join(" ", Enumerable.Repeat("word", 100)))], Greedy));
        Assert.Contains("KV cache holds 64 tokens", e.Message);
    }

    [Fact]
    public async Task A_template_that_raises_surfaces_its_message()
    {
        var client = new LocalVllmChatClient(new ScriptedEngine("{{ raise_exception('Conversation roles must alternate user/assistant') }}", ["x"]));
        var e = await Assert.ThrowsAsync<TemplateRaisedException>(() => client.GetResponseAsync([new ChatMessage(ChatRole.User, "hi")]));
        Assert.Equal("Conversation roles must alternate user/assistant", e.Message);
    }

    [Fact]
    public async Task Overload_rejects_at_once_with_a_typed_exception_and_accepted_requests_complete()
    {
        var logs = new ListLogger();
        using var engine = new AsyncLlmEngine(new EngineOptions { Model = ModelDir, KvCacheMemoryBytes = 4L << 20, MaxNumSeqs = 1, MaxWaitingRequests = 3 }, logs);
        var sampling = new SamplingParams { Temperature = 0, MaxTokens = 30, IgnoreEos = true };
        var calls = Enumerable.Range(0, 12).Select(i => engine.GenerateFinalAsync([1000 + i, 2000, 3000], sampling)).ToArray();
        var sw = Stopwatch.StartNew();
        int rejected = 0, completed = 0;
        foreach (var call in calls)
        {
            try { Assert.Equal(30, (await call.WaitAsync(TimeSpan.FromSeconds(60))).Outputs[0].TokenIds.Count); completed++; }
            catch (EngineOverloadedException e) { rejected++; Assert.Contains("MaxWaitingRequests = 3", e.Message); }
        }
        // Arriving together, at most MaxWaitingRequests (3) wait, plus whatever the engine admitted in between.
        Assert.Equal(12, rejected + completed);
        Assert.InRange(completed, 3, 5);
        Assert.Contains(logs.Entries, e => e.Message.Contains("rejected") && e.Message.Contains("MaxWaitingRequests"));
        await engine.InvokeAsync(e => e.Blocks.CheckInvariants(expectAllFree: true));
        output.WriteLine($"overload: {completed} completed, {rejected} rejected in {sw.ElapsedMilliseconds} ms");
    }

    [Fact]
    public async Task A_request_past_its_deadline_ends_with_a_timeout_and_frees_its_blocks()
    {
        using var engine = new AsyncLlmEngine(new EngineOptions { Model = ModelDir, KvCacheMemoryBytes = 4L << 20 });
        var sampling = new SamplingParams { Temperature = 0, MaxTokens = 8000, IgnoreEos = true }; // the 4 MiB cache holds 8,192 tokens
        await Assert.ThrowsAsync<TimeoutException>(async () =>
        {
            await foreach (var _ in engine.GenerateAsync([5, 6, 7], sampling, deadline: DateTimeOffset.UtcNow.AddMilliseconds(200))) { }
        });
        await engine.InvokeAsync(e => { Assert.False(e.HasUnfinishedRequests); e.Blocks.CheckInvariants(expectAllFree: true); });
        var ok = await engine.GenerateFinalAsync([5, 6, 7], new SamplingParams { Temperature = 0, MaxTokens = 4, IgnoreEos = true });
        Assert.Equal(4, ok.Outputs[0].TokenIds.Count);
    }

    [Fact]
    public async Task A_cancellation_storm_ends_every_call_and_leaks_no_block()
    {
        using var engine = new LocalVllmEngine(new EngineOptions { Model = ModelDir, KvCacheMemoryBytes = 32L << 20 });
        var client = new LocalVllmChatClient(engine);
        var reference = (await client.GetResponseAsync([new ChatMessage(ChatRole.User, "Are you still there?")], Greedy)).Text;
        var rng = new Random(42);
        int completed = 0, cancelled = 0;
        var options = Greedy.Clone();
        options.MaxOutputTokens = 24;
        var sw = Stopwatch.StartNew();
        var calls = Enumerable.Range(0, 200).Select(async i =>
        {
            bool cancel = rng.Next(3) == 0;
            int cancelAfter = rng.Next(0, 12);
            using var cts = new CancellationTokenSource();
            if (cancel && cancelAfter == 0) cts.CancelAfter(rng.Next(1, 50));
            try
            {
                int n = 0;
                await foreach (var u in client.GetStreamingResponseAsync([new ChatMessage(ChatRole.User, $"Request {i}: tell me something.")], options, cts.Token))
                    if (cancel && ++n == cancelAfter) cts.Cancel();
                Interlocked.Increment(ref completed);
            }
            catch (OperationCanceledException)
            {
                Interlocked.Increment(ref cancelled);
            }
        }).ToArray();
        await Task.WhenAll(calls).WaitAsync(TimeSpan.FromMinutes(3));
        Assert.Equal(200, completed + cancelled);
        Assert.True(cancelled > 20, $"{cancelled} cancelled");
        await AssertHealthyAsync(engine, client, reference);
        output.WriteLine($"storm: {completed} completed, {cancelled} cancelled in {sw.Elapsed.TotalSeconds:F1} s");
    }

    [Fact]
    public async Task A_failing_stop_condition_fails_only_its_own_request()
    {
        using var engine = new AsyncLlmEngine(new EngineOptions { Model = ModelDir, KvCacheMemoryBytes = 8L << 20 });
        var good = new SamplingParams { Temperature = 0, MaxTokens = 12, IgnoreEos = true };
        var expected = await engine.GenerateFinalAsync([11, 12, 13], good);
        var bad = good with { StopCondition = text => text.Length > 0 ? throw new InvalidOperationException("callback exploded") : false };
        var badCall = engine.GenerateFinalAsync([21, 22, 23], bad);
        var goodCall = engine.GenerateFinalAsync([11, 12, 13], good);
        var e = await Assert.ThrowsAsync<RequestFailedException>(() => badCall);
        Assert.Contains("callback exploded", e.Message);
        Assert.Equal(expected.Outputs[0].TokenIds, (await goodCall).Outputs[0].TokenIds);
        await engine.InvokeAsync(x => x.Blocks.CheckInvariants(expectAllFree: true));
    }

    private sealed class FaultyAttention : IAttentionBackend
    {
        private readonly TorchPagedAttention _inner = new();
        public volatile bool Fail;
        public Tensor Forward(Tensor q, Tensor k, Tensor v, Tensor kCache, Tensor vCache, AttentionMetadata metadata) =>
            Fail ? throw new InvalidOperationException("simulated device fault") : _inner.Forward(q, k, v, kCache, vCache, metadata);
    }

    [Fact]
    public async Task A_forward_pass_failure_fails_the_steps_requests_and_the_engine_recovers()
    {
        var attention = new FaultyAttention();
        var logs = new ListLogger();
        using var engine = new AsyncLlmEngine(new EngineOptions { Model = ModelDir, KvCacheMemoryBytes = 8L << 20, AttentionBackend = attention }, logs);
        var sampling = new SamplingParams { Temperature = 0, MaxTokens = 6, IgnoreEos = true };
        var expected = await engine.GenerateFinalAsync([31, 32, 33], sampling);
        attention.Fail = true;
        var failing = Enumerable.Range(0, 3).Select(i => engine.GenerateFinalAsync([40 + i, 50, 60], sampling)).ToArray();
        foreach (var f in failing)
        {
            var e = await Assert.ThrowsAsync<EngineStepException>(() => f);
            Assert.Contains("simulated device fault", e.Message);
        }
        attention.Fail = false;
        Assert.Equal(expected.Outputs[0].TokenIds, (await engine.GenerateFinalAsync([31, 32, 33], sampling)).Outputs[0].TokenIds);
        await engine.InvokeAsync(x => x.Blocks.CheckInvariants(expectAllFree: true));
        Assert.Contains(logs.Entries, e => e.Level == LogLevel.Error && e.Message.Contains("simulated device fault"));
    }

    [Fact]
    public async Task Disposing_the_engine_ends_in_flight_chats_promptly()
    {
        var engine = new LocalVllmEngine(new EngineOptions { Model = ModelDir, KvCacheMemoryBytes = 8L << 20 });
        var client = new LocalVllmChatClient(engine);
        var options = Greedy.Clone();
        options.MaxOutputTokens = 20000;
        var streaming = Enumerable.Range(0, 5).Select(_ => new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously)).ToArray();
        var calls = Enumerable.Range(0, 5).Select(i => Task.Run(async () =>
        {
            await foreach (var _ in client.GetStreamingResponseAsync([new ChatMessage(ChatRole.User, $"Go {i}")], options)) streaming[i].TrySetResult();
        })).ToArray();
        // Every call has streamed an update, so the dispose below lands while all five are generating.
        await Task.WhenAll(streaming.Select(s => s.Task)).WaitAsync(TimeSpan.FromSeconds(60));
        var sw = Stopwatch.StartNew();
        engine.Dispose();
        foreach (var c in calls)
        {
            var e = await Record.ExceptionAsync(() => c.WaitAsync(TimeSpan.FromSeconds(30)));
            Assert.True(e is ObjectDisposedException or OperationCanceledException, e?.ToString() ?? "completed normally");
        }
        output.WriteLine($"dispose: in-flight calls ended {sw.ElapsedMilliseconds} ms after Dispose");
    }

    internal sealed class ListLogger : ILogger
    {
        public List<(LogLevel Level, string Message)> Entries { get; } = [];
        public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;
        public bool IsEnabled(LogLevel logLevel) => true;
        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
        {
            lock (Entries) Entries.Add((logLevel, formatter(state, exception)));
        }
    }
}
