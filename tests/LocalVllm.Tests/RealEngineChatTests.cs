using LocalVllm.Engine;
using LocalVllm.Engine.Text.Templating;
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

    /// <summary>
    /// A prefilled reply (vLLM's continue_final_message): the final assistant message is left open, and the model goes on
    /// with it. The render is the fixture's reference prompt followed by the prefill, and the model continues the
    /// fixture's greedy reply from where the prefill ends.
    /// </summary>
    [Fact]
    public async Task Continue_final_message_prefills_the_reply_and_the_model_continues_the_reference_greedy_reply()
    {
        using var engine = NewEngine();
        var client = new LocalVllmChatClient(engine);
        var tokenizer = engine.Engine.Engine.Tokenizer!;
        var c = Fixtures.Reference("tiny-qwen3-chat")["cases"]![0]!;
        var greedy = Fixtures.Ints(c["greedy_ids"]);
        // The longest prefill of at most 8 reference tokens that has no whitespace at its ends (templates trim it).
        int k = Enumerable.Range(1, 8).Last(n => tokenizer.Decode(greedy[..n]) is { Length: > 0 } t && t.Trim() == t);
        string prefill = tokenizer.Decode(greedy[..k]);
        var messages = c["messages"]!.AsArray().Select(m => new ChatMessage(new ChatRole(m!["role"]!.GetValue<string>()), m["content"]!.GetValue<string>()))
            .Append(new ChatMessage(ChatRole.Assistant, prefill)).ToList();
        var options = Greedy.Clone();
        options.MaxOutputTokens = greedy.Length - k;
        options.AdditionalProperties!["continue_final_message"] = true;

        var (text, ids) = client.RenderPrompt(messages, options);
        Assert.Equal(c["prompt_text"]!.GetValue<string>() + prefill, text);
        Assert.Equal([.. Fixtures.Ints(c["prompt_ids"]), .. greedy[..k]], ids);
        var response = await client.GetResponseAsync(messages, options);
        Assert.Equal(tokenizer.Decode(greedy[k..]), response.Text);
        Assert.Equal(greedy.Length - k, response.Usage!.OutputTokenCount);

        // Without it the assistant message is a finished turn and a new one starts; both at once is refused by name.
        var closed = client.RenderPrompt(messages, Greedy).Text;
        Assert.StartsWith(text, closed);
        Assert.EndsWith("<|im_start|>assistant\n<think>\n\n</think>\n\n", closed);
        var both = options.Clone();
        both.AdditionalProperties = new(options.AdditionalProperties) { ["add_generation_prompt"] = true };
        var e = await Assert.ThrowsAsync<ArgumentException>(() => client.GetResponseAsync(messages, both));
        Assert.Contains("continue_final_message", e.Message);
        Assert.Contains("add_generation_prompt", e.Message);
    }

    /// <summary>
    /// Streaming against the fixture's independent greedy ids (every case), not against the non-streaming path built on
    /// it; also with the engine's StreamInterval, whose updates carry several tokens after the first.
    /// </summary>
    [Theory]
    [InlineData(1)]
    [InlineData(5)]
    public async Task Streaming_yields_the_reference_greedy_continuation_and_its_usage(int streamInterval)
    {
        using var engine = new LocalVllmEngine(new EngineOptions { Model = ModelDir, KvCacheMemoryBytes = 16L << 20, StreamInterval = streamInterval });
        var client = new LocalVllmChatClient(engine);
        var tokenizer = engine.Engine.Engine.Tokenizer!;
        foreach (var c in Fixtures.Reference("tiny-qwen3-chat")["cases"]!.AsArray().Where(x => x!["tools"] is null))
        {
            var messages = c!["messages"]!.AsArray()
                .Select(m => new ChatMessage(new ChatRole(m!["role"]!.GetValue<string>()), m["content"]!.GetValue<string>())).ToList();
            var greedy = Fixtures.Ints(c["greedy_ids"]);
            var options = Greedy.Clone();
            options.MaxOutputTokens = greedy.Length;
            var streamed = new System.Text.StringBuilder();
            var finish = new List<ChatFinishReason>();
            UsageDetails? usage = null;
            int updates = 0, textUpdates = 0;
            await foreach (var u in client.GetStreamingResponseAsync(messages, options))
            {
                updates++;
                if (u.Text.Length > 0) textUpdates++;
                streamed.Append(u.Text);
                if (u.FinishReason is { } f) finish.Add(f);
                usage ??= u.Contents.OfType<UsageContent>().SingleOrDefault()?.Details;
            }
            Assert.Equal(tokenizer.Decode(greedy), streamed.ToString());
            Assert.Equal([ChatFinishReason.Length], finish);
            Assert.Equal(Fixtures.Ints(c["prompt_ids"]).Length, usage!.InputTokenCount);
            Assert.Equal(greedy.Length, usage.OutputTokenCount);
            Assert.True(updates >= 2, $"{c["name"]}: {updates} update(s); a stream of {greedy.Length} tokens arrived in one piece");
            // The first token alone, then one update per interval at most (an update can also be a token that adds no text yet).
            Assert.InRange(textUpdates, 1, 1 + (greedy.Length - 1 + streamInterval - 1) / streamInterval);
        }
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
    public async Task A_pinned_system_prompt_serves_the_first_call_from_cache()
    {
        var system = string.Join(" ", Enumerable.Repeat("You are a careful assistant that follows the house rules.", 12));
        var services = new ServiceCollection();
        services.AddLocalVllm(o => { o.Model = ModelDir; o.Engine.KvCacheMemoryBytes = 8L << 20; o.PinnedSystemPrompts = [system]; });
        using var sp = services.BuildServiceProvider();
        var client = sp.GetRequiredService<IChatClient>();
        var engine = client.GetService<AsyncLlmEngine>()!;
        Assert.True(engine.Stats.KvBlocksPinned > 0);
        var r = await client.GetResponseAsync([new ChatMessage(ChatRole.System, system), new ChatMessage(ChatRole.User, "First question")], Greedy);
        Assert.Equal(engine.Stats.KvBlocksPinned * 16, r.Usage!.CachedInputTokenCount);
    }

    [Fact]
    public async Task A_second_turn_reuses_the_first_turn_up_to_where_the_template_rewrites_history()
    {
        using var engine = NewEngine();
        var client = new LocalVllmChatClient(engine);
        var tokenizer = engine.Engine.Engine.Tokenizer!;
        var template = engine.ChatTemplate;
        List<ChatMessage> conversation = [new(ChatRole.System, "You are terse."), new(ChatRole.User, "Name three colours.")];
        var options = Greedy.Clone();
        options.AdditionalProperties!.Remove("ignore_eos");
        var first = await client.GetResponseAsync(conversation, options);
        var firstIds = Render(conversation, addGenerationPrompt: true);

        conversation.AddRange(first.Messages);
        conversation.Add(new(ChatRole.User, "And three more."));
        var second = await client.GetResponseAsync(conversation, options);
        var secondIds = Render(conversation, addGenerationPrompt: true);

        // What the cache can serve: the longest common prefix of the new prompt and turn 1's prompt + reply, in full blocks.
        var turn1 = firstIds.Concat(tokenizer.Encode(first.Text, addSpecialTokens: false)).ToArray();
        int common = 0;
        while (common < Math.Min(turn1.Length, secondIds.Length) && turn1[common] == secondIds[common]) common++;
        Assert.Equal(common / 16 * 16, second.Usage!.CachedInputTokenCount);
        Assert.True(second.Usage.CachedInputTokenCount >= firstIds.Length / 16 * 16 - 16);
        // Qwen3's template drops the empty <think></think> block from earlier assistant turns, so the reply is not
        // reused: the common prefix ends at the first turn's "<|im_start|>assistant\n".
        var header = tokenizer.Encode("<|im_start|>assistant\n", addSpecialTokens: false);
        int assistantStart = Enumerable.Range(0, firstIds.Length - header.Length + 1).Last(i => firstIds.Skip(i).Take(header.Length).SequenceEqual(header));
        Assert.Equal(firstIds.Length - header.Length - 4, assistantStart); // then <think>, "\n\n", </think>, "\n\n" 
        Assert.Equal(assistantStart + header.Length, common);

        int[] Render(List<ChatMessage> messages, bool addGenerationPrompt)
        {
            var mapped = ChatRequestMapper.Map(messages, options, engine.ModelId);
            return tokenizer.Encode(template.Render(mapped.Messages, mapped.Tools, addGenerationPrompt, mapped.ExtraContext), addSpecialTokens: false);
        }
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
