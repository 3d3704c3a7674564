using System.Diagnostics;
using LocalVllm.Engine;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.Caching.Distributed;
using Microsoft.Extensions.Caching.Memory;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Options;

namespace LocalVllm.Tests;

/// <summary>
/// What Microsoft.Extensions.AI's integration tests check of every chat client, in our words: on the real engine and
/// the tiny Qwen3 fixture where the model's output does not matter, through the scripted engine seam where it does.
/// </summary>
public sealed class ConformanceTests
{
    private static readonly ChatMessage[] Question = [new(ChatRole.User, "What is the capital of France?")];

    private static LocalVllmEngine NewEngine() => new(new EngineOptions
    {
        Model = Fixtures.Model("tiny-qwen3-chat"), KvCacheMemoryBytes = 16L << 20, EnablePrefixCaching = false,
    });

    private static ChatOptions Greedy(int tokens) => new()
    {
        Temperature = 0, MaxOutputTokens = tokens, AdditionalProperties = new() { ["enable_thinking"] = false, ["ignore_eos"] = true },
    };

    [Fact]
    public async Task A_stream_has_exactly_one_usage_whose_totals_add_up_and_it_equals_the_non_streamed_response()
    {
        using var engine = NewEngine();
        var client = new LocalVllmChatClient(engine);
        var updates = new List<ChatResponseUpdate>();
        await foreach (var u in client.GetStreamingResponseAsync(Question, Greedy(10))) updates.Add(u);
        var usage = Assert.Single(updates.SelectMany(u => u.Contents).OfType<UsageContent>()).Details;
        Assert.Equal(10, usage.OutputTokenCount);
        Assert.Equal(usage.InputTokenCount + usage.OutputTokenCount, usage.TotalTokenCount);
        Assert.Equal(engine.EncodeChatPrompt(engine.ChatTemplate.Render(
            [new System.Text.Json.Nodes.JsonObject { ["role"] = "user", ["content"] = Question[0].Text }], null, true,
            new Dictionary<string, System.Text.Json.Nodes.JsonNode?> { ["enable_thinking"] = false })).Length, usage.InputTokenCount);

        var streamed = updates.ToChatResponse();
        var whole = await client.GetResponseAsync(Question, Greedy(10));
        Assert.Equal(whole.Text, streamed.Text);
        Assert.Equal(whole.FinishReason, streamed.FinishReason);
        Assert.Equal(whole.ModelId, streamed.ModelId);
        Assert.Equal(whole.Messages.Count, streamed.Messages.Count);
        Assert.Equal(whole.Messages[0].Role, streamed.Messages[0].Role);
        Assert.Equal((whole.Usage!.InputTokenCount, whole.Usage.OutputTokenCount, whole.Usage.TotalTokenCount, whole.Usage.CachedInputTokenCount),
            (streamed.Usage!.InputTokenCount, streamed.Usage.OutputTokenCount, streamed.Usage.TotalTokenCount, streamed.Usage.CachedInputTokenCount));
        Assert.NotEqual(whole.ResponseId, streamed.ResponseId);
    }

    [Fact]
    public async Task A_streamed_reply_appended_to_the_history_renders_as_the_assistant_turn_of_the_next_call()
    {
        var engine = new ScriptedEngine(["Par", "is", "."], ["Rome", "."]);
        var client = new LocalVllmChatClient(engine);
        List<ChatMessage> history = [new(ChatRole.User, "Capital of France?")];
        var updates = new List<ChatResponseUpdate>();
        await foreach (var u in client.GetStreamingResponseAsync(history)) updates.Add(u);
        history.AddMessages(updates);
        Assert.Equal(2, history.Count);
        Assert.Equal(ChatRole.Assistant, history[1].Role);
        history.Add(new ChatMessage(ChatRole.User, "And Italy?"));
        var second = await client.GetResponseAsync(history);
        Assert.Equal("Rome.", second.Text);
        Assert.EndsWith("<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n<|im_start|>user\nAnd Italy?<|im_end|>\n<|im_start|>assistant\n",
            engine.Prompts[1]);
    }

    [Fact]
    public async Task The_distributed_cache_middleware_answers_a_repeated_prompt_without_the_engine()
    {
        var engine = new ScriptedEngine(["Paris", "."], ["never", "used"]);
        using var client = new ChatClientBuilder(new LocalVllmChatClient(engine))
            .UseDistributedCache(new MemoryDistributedCache(Options.Create(new MemoryDistributedCacheOptions())))
            .Build();
        var first = await client.GetResponseAsync(Question);
        var second = await client.GetResponseAsync(Question);
        Assert.Equal("Paris.", second.Text);
        Assert.Equal(first.Text, second.Text);
        Assert.Single(engine.Samplings); // the second call never reached the engine
    }

    [Fact]
    public async Task OpenTelemetry_spans_carry_token_counts_the_provider_and_the_server_address()
    {
        string source = $"localvllm-test-{Guid.NewGuid():N}";
        var spans = new List<Activity>();
        using var listener = new ActivityListener
        {
            ShouldListenTo = s => s.Name == source,
            Sample = (ref ActivityCreationOptions<ActivityContext> _) => ActivitySamplingResult.AllDataAndRecorded,
            ActivityStopped = spans.Add,
        };
        ActivitySource.AddActivityListener(listener);
        var engine = new ScriptedEngine(["Paris", "."]);
        using var client = new ChatClientBuilder(new LocalVllmChatClient(engine)).UseOpenTelemetry(sourceName: source).Build();
        var response = await client.GetResponseAsync(Question);

        var span = Assert.Single(spans);
        Assert.Equal(response.Usage!.InputTokenCount, Convert.ToInt64(span.GetTagItem("gen_ai.usage.input_tokens")));
        Assert.Equal(2L, Convert.ToInt64(span.GetTagItem("gen_ai.usage.output_tokens")));
        Assert.Equal("localhost", span.GetTagItem("server.address"));
        Assert.Equal("localvllm", span.GetTagItem("gen_ai.provider.name") ?? span.GetTagItem("gen_ai.system"));
        Assert.Equal("scripted-qwen3", span.GetTagItem("gen_ai.request.model"));
    }

    [Fact]
    public async Task The_logging_middleware_logs_each_call_and_its_completion()
    {
        var logger = new ScriptedChatTests.ListLogger();
        var engine = new ScriptedEngine(["Paris", "."], ["Paris", "."]);
        using var client = new ChatClientBuilder(new LocalVllmChatClient(engine)).UseLogging(new OneLoggerFactory(logger)).Build();
        await client.GetResponseAsync(Question);
        await foreach (var _ in client.GetStreamingResponseAsync(Question)) { }
        Assert.Contains(logger.Entries, e => e.Message.Contains("GetResponseAsync invoked"));
        Assert.Contains(logger.Entries, e => e.Message.Contains("GetResponseAsync completed"));
        Assert.Contains(logger.Entries, e => e.Message.Contains("GetStreamingResponseAsync invoked"));
        Assert.Contains(logger.Entries, e => e.Message.Contains("GetStreamingResponseAsync completed"));
    }

    [Fact]
    public async Task A_function_invocation_round_trip_sums_the_usage_of_both_calls()
    {
        var engine = new ScriptedEngine(
            ["<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"],
            ["It is ", "sunny", "."]);
        var tool = AIFunctionFactory.Create((string city) => $"sunny in {city}", "get_weather");
        using var client = new ChatClientBuilder(new LocalVllmChatClient(engine)).UseFunctionInvocation().Build();
        var response = await client.GetResponseAsync([new ChatMessage(ChatRole.User, "Weather in Paris?")], new ChatOptions { Tools = [tool] });

        Assert.Equal("It is sunny.", response.Text);
        Assert.Equal(2, engine.Prompts.Count);
        var tokenizer = new ScriptedEngine();
        long input = engine.Prompts.Sum(p => (long)tokenizer.EncodeChatPrompt(p).Length);
        Assert.Equal(input, response.Usage!.InputTokenCount);
        Assert.Equal(1 + 3, response.Usage.OutputTokenCount); // one chunk for the call, three for the answer
        Assert.Equal(input + 4, response.Usage.TotalTokenCount);
        Assert.Equal(2 * 16, response.Usage.CachedInputTokenCount);
    }

    private sealed class OneLoggerFactory(ILogger logger) : ILoggerFactory
    {
        public ILogger CreateLogger(string categoryName) => logger;
        public void AddProvider(ILoggerProvider provider) { }
        public void Dispose() { }
    }
}
