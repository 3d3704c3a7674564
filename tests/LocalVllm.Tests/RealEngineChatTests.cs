using LocalVllm.Engine;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.SemanticKernel;

namespace LocalVllm.Tests;

/// <summary>The chat client end to end on the real engine and the tiny Qwen3 fixture (real tokenizer and template).</summary>
public sealed class RealEngineChatTests
{
    private static string ModelDir => Fixtures.Model("tiny-qwen3-chat");

    private static LocalVllmEngine NewEngine() =>
        new(new EngineOptions { Model = ModelDir, KvCacheMemoryBytes = 16L << 20 });

    private static readonly ChatOptions Greedy = new() { Temperature = 0, MaxOutputTokens = 12, AdditionalProperties = new() { ["enable_thinking"] = false, ["ignore_eos"] = true } };

    [Fact]
    public async Task A_chat_call_generates_the_reference_greedy_ids_and_reports_usage_with_cached_tokens()
    {
        using var engine = NewEngine();
        var client = new LocalVllmChatClient(engine);
        var c = Fixtures.Reference("tiny-qwen3-chat")["cases"]![0]!;
        var messages = c["messages"]!.AsArray().Select(m => new ChatMessage(new ChatRole(m!["role"]!.GetValue<string>()), m["content"]!.GetValue<string>())).ToList();
        var greedy = Fixtures.Ints(c["greedy_ids"]);
        var options = Greedy.Clone();
        options.MaxOutputTokens = greedy.Length;

        var first = await client.GetResponseAsync(messages, options);
        var tokenizer = engine.Engine.Engine.Tokenizer!;
        int promptLen = Fixtures.Ints(c["prompt_ids"]).Length;
        Assert.Equal(promptLen, first.Usage!.InputTokenCount);
        Assert.Equal(greedy.Length, first.Usage.OutputTokenCount);
        Assert.Equal(promptLen + greedy.Length, first.Usage.TotalTokenCount);
        Assert.Equal(ChatFinishReason.Length, first.FinishReason);
        Assert.Equal(tokenizer.Decode(greedy), first.Text);
        Assert.Equal("tiny-qwen3-chat", first.ModelId);
        Assert.NotNull(first.ResponseId);
        Assert.NotNull(first.CreatedAt);

        var second = await client.GetResponseAsync(messages, options);
        Assert.Equal(first.Text, second.Text);
        Assert.Equal((promptLen - 1) / 16 * 16, second.Usage!.CachedInputTokenCount);
        Assert.True(second.Usage.CachedInputTokenCount > 0);
    }

    [Fact]
    public async Task Streaming_text_equals_the_non_streaming_text()
    {
        using var engine = NewEngine();
        var client = new LocalVllmChatClient(engine);
        ChatMessage[] messages = [new(ChatRole.User, "Tell me a story about a robot.")];
        var whole = await client.GetResponseAsync(messages, Greedy);
        var streamed = "";
        ChatFinishReason? finish = null;
        await foreach (var u in client.GetStreamingResponseAsync(messages, Greedy))
        {
            streamed += u.Text;
            finish ??= u.FinishReason;
        }
        Assert.Equal(whole.Text, streamed);
        Assert.Equal(whole.FinishReason, finish);
    }

    [Fact]
    public async Task Cancelling_a_stream_frees_its_blocks_at_once_and_concurrent_calls_still_complete()
    {
        using var engine = NewEngine();
        var client = new LocalVllmChatClient(engine);
        var others = Enumerable.Range(0, 4).Select(i => client.GetResponseAsync([new ChatMessage(ChatRole.User, $"Question {i}")], Greedy)).ToArray();
        using var cts = new CancellationTokenSource();
        var long_ = Greedy.Clone();
        long_.MaxOutputTokens = 2000;
        int n = 0;
        await Assert.ThrowsAnyAsync<OperationCanceledException>(async () =>
        {
            await foreach (var _ in client.GetStreamingResponseAsync([new ChatMessage(ChatRole.User, "Go on forever")], long_, cts.Token))
                if (++n == 2) cts.Cancel();
        });
        foreach (var r in await Task.WhenAll(others)) Assert.Equal(12, r.Usage!.OutputTokenCount);
        await engine.Engine.InvokeAsync(e =>
        {
            Assert.False(e.HasUnfinishedRequests);
            e.Blocks.CheckInvariants(expectAllFree: true);
        });
    }

    [Fact]
    public void Dependency_injection_resolves_the_client_with_and_without_configuration()
    {
        var services = new ServiceCollection();
        services.AddLocalVllm(o => { o.Model = ModelDir; o.Engine.KvCacheMemoryBytes = 8L << 20; }).UseFunctionInvocation();
        using (var sp = services.BuildServiceProvider())
        {
            var client = sp.GetRequiredService<IChatClient>();
            Assert.Equal("localvllm", client.GetService<ChatClientMetadata>()!.ProviderName);
            Assert.NotNull(client.GetService<AsyncLlmEngine>());
        }

        var config = new ConfigurationBuilder().AddInMemoryCollection(new Dictionary<string, string?>
        {
            ["LocalVllm:Model"] = ModelDir, ["LocalVllm:ModelId"] = "qwen-tiny", ["LocalVllm:Engine:KvCacheMemoryBytes"] = "8388608",
        }).Build();
        var services2 = new ServiceCollection();
        services2.AddLocalVllm(config.GetSection("LocalVllm"));
        services2.AddKeyedLocalVllm("second", o => { o.Model = Fixtures.Model("tiny-qwen3-chat"); o.ModelId = "second"; o.Engine.KvCacheMemoryBytes = 8L << 20; });
        using var sp2 = services2.BuildServiceProvider();
        Assert.Equal("qwen-tiny", sp2.GetRequiredService<IChatClient>().GetService<ChatClientMetadata>()!.DefaultModelId);
        Assert.Equal("second", sp2.GetRequiredKeyedService<IChatClient>("second").GetService<ChatClientMetadata>()!.DefaultModelId);
    }

    [Fact]
    public void Bad_options_fail_at_registration_with_a_clear_message()
    {
        var e = Assert.Throws<InvalidOperationException>(() => new ServiceCollection().AddLocalVllm(o => { }));
        Assert.Contains("Model", e.Message);
        e = Assert.Throws<InvalidOperationException>(() => new ServiceCollection().AddLocalVllm(o => o.Model = "/no/such/model"));
        Assert.Contains("no such directory", e.Message);
    }

    [Fact]
    public async Task Semantic_kernel_invokes_prompts_on_the_local_model()
    {
        var builder = Kernel.CreateBuilder();
        builder.AddLocalVllmChatCompletion(o => { o.Model = ModelDir; o.Engine.KvCacheMemoryBytes = 8L << 20; });
        var kernel = builder.Build();
        var settings = new PromptExecutionSettings { ExtensionData = new Dictionary<string, object> { ["temperature"] = 0.0, ["max_tokens"] = 8 } };
        var result = await kernel.InvokePromptAsync("Say hello", new KernelArguments(settings));
        var direct = await kernel.GetRequiredService<IChatClient>().GetResponseAsync([new ChatMessage(ChatRole.User, "Say hello")], new ChatOptions { Temperature = 0, MaxOutputTokens = 8 });
        Assert.Equal(direct.Text, result.GetValue<string>());
        Assert.False(string.IsNullOrEmpty(direct.Text));
    }
}
