using System.Reflection;
using System.Text.Json;
using LocalVllm.Engine;
using LocalVllm.Engine.Attention;
using LocalVllm.Engine.Loading.Hub;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Options;

namespace LocalVllm.Tests;

/// <summary>The Microsoft.Extensions.AI and options conventions a provider is expected to follow (issue 21).</summary>
public sealed class ConventionTests
{
    private static readonly ChatMessage[] Hello = [new(ChatRole.User, "Hi")];
    private static string ModelDir => Fixtures.Model("tiny-qwen3-chat");

    // Properties configuration cannot carry (objects and delegates): each is checked by hand below.
    private static readonly HashSet<string> NotBindable = ["Engine:AttentionBackend", "Engine:Hub:Progress", "Engine:Hub:Handler"];

    /// <summary>
    /// A non-default value for every bindable property of <paramref name="type"/>, as configuration keys; fails on a
    /// property type it does not know, so a new option cannot slip past this test.
    /// </summary>
    private static void NonDefaults(Type type, object defaults, string prefix, Dictionary<string, string?> config, Dictionary<string, object?> expected)
    {
        foreach (var p in type.GetProperties(BindingFlags.Public | BindingFlags.Instance).Where(p => p.SetMethod?.IsPublic == true))
        {
            string key = prefix + p.Name;
            if (key == "Engine:Model" || NotBindable.Contains(key)) continue;
            var t = Nullable.GetUnderlyingType(p.PropertyType) ?? p.PropertyType;
            var current = p.GetValue(defaults);
            object? value = t switch
            {
                _ when t == typeof(int) => (int)(current ?? 0) + 7,
                _ when t == typeof(long) => (long)(current ?? 0L) + 7,
                _ when t == typeof(bool) => !(bool)(current ?? false),
                _ when t == typeof(string) => p.Name switch { "DType" => "bfloat16", "Device" => "cuda", _ => $"/x/{p.Name}" },
                _ when t == typeof(IReadOnlyList<string>) => new[] { "head one", "head two" },
                _ when t == typeof(IReadOnlyList<IReadOnlyList<int>>) => new[] { new[] { 5, 6 } },
                _ when t == typeof(IReadOnlyDictionary<string, double>) => new Dictionary<string, double> { ["temperature"] = 0.5, ["top_k"] = 3 },
                _ when t == typeof(HubOptions) || t == typeof(SpeculativeConfig) => null,
                _ => throw new InvalidOperationException($"{key}: no test value for type {t.Name}; extend this test."),
            };
            if (t == typeof(HubOptions) || t == typeof(SpeculativeConfig))
            {
                NonDefaults(t, Activator.CreateInstance(t)!, key + ":", config, expected);
                continue;
            }
            switch (value)
            {
                case string[] list:
                    for (int i = 0; i < list.Length; i++) config[$"{key}:{i}"] = list[i];
                    break;
                case int[][] lists:
                    for (int i = 0; i < lists.Length; i++)
                        for (int j = 0; j < lists[i].Length; j++) config[$"{key}:{i}:{j}"] = lists[i][j].ToString();
                    break;
                case Dictionary<string, double> map:
                    foreach (var (k, v) in map) config[$"{key}:{k}"] = v.ToString(System.Globalization.CultureInfo.InvariantCulture);
                    break;
                default:
                    config[key] = Convert.ToString(value, System.Globalization.CultureInfo.InvariantCulture);
                    break;
            }
            expected[key] = value;
        }
    }

    [Fact]
    public void Every_engine_option_bound_from_configuration_arrives_in_the_engine_options()
    {
        var config = new Dictionary<string, string?> { ["Model"] = ModelDir, ["ModelId"] = "my-model", ["PinnedSystemPrompts:0"] = "Be brief." };
        var expected = new Dictionary<string, object?>();
        NonDefaults(typeof(EngineOptions), new EngineOptions(), "Engine:", config, expected);
        Assert.Contains("Engine:MaxWaitingRequests", expected.Keys);
        Assert.Contains("Engine:UseProgressBar", expected.Keys);

        var services = new ServiceCollection();
        services.AddLocalVllm(new ConfigurationBuilder().AddInMemoryCollection(config).Build());
        using var sp = services.BuildServiceProvider();
        var options = sp.GetRequiredService<IOptions<LocalVllmOptions>>().Value;
        Assert.Equal("my-model", options.ModelId);
        Assert.Equal(["Be brief."], options.PinnedSystemPrompts);
        var engine = options.ToEngineOptions();
        Assert.Equal(ModelDir, engine.Model);
        foreach (var (key, value) in expected)
        {
            object? target = engine;
            var parts = key.Split(':')[1..];
            foreach (var part in parts[..^1]) target = target!.GetType().GetProperty(part)!.GetValue(target);
            var actual = target!.GetType().GetProperty(parts[^1])!.GetValue(target);
            switch (value)
            {
                case string[] list: Assert.Equal(list, (IEnumerable<string>)actual!); break;
                case int[][] lists: Assert.Equal(lists, ((IEnumerable<IReadOnlyList<int>>)actual!).Select(l => l.ToArray())); break;
                case Dictionary<string, double> map: Assert.Equal(map, ((IReadOnlyDictionary<string, double>)actual!).ToDictionary()); break;
                default: Assert.True(Equals(value, actual), $"{key}: bound {value}, engine options hold {actual}"); break;
            }
        }
    }

    [Fact]
    public void Options_set_in_code_that_configuration_cannot_carry_reach_the_engine_options_too()
    {
        var backend = new TorchPagedAttention();
        var hub = new HubOptions { Offline = true, ConsoleProgress = false };
        var options = new LocalVllmOptions { Model = ModelDir };
        options.Engine.AttentionBackend = backend;
        options.Engine.Hub = hub;
        options.Engine.MaxWaitingRequests = 3;
        var engine = options.ToEngineOptions();
        Assert.Same(backend, engine.AttentionBackend);
        Assert.Same(hub, engine.Hub);
        Assert.Equal(3, engine.MaxWaitingRequests);
        Assert.NotSame(options.Engine, engine); // a copy: setting Model on it leaves the caller's options alone
        Assert.Equal("", options.Engine.Model);
    }

    [Fact]
    public void The_engine_reads_its_options_through_IOptions_and_keyed_registrations_through_named_options()
    {
        var services = new ServiceCollection();
        services.Configure<LocalVllmOptions>(o => { o.Model = ModelDir; o.Engine.KvCacheMemoryBytes = 8L << 20; o.Engine.MaxWaitingRequests = 3; });
        services.AddLocalVllm();
        services.AddKeyedLocalVllm("small", o => { o.Model = ModelDir; o.ModelId = "small"; o.Engine.KvCacheMemoryBytes = 8L << 20; o.Engine.MaxNumSeqs = 5; });
        services.Configure<LocalVllmOptions>(ServiceCollectionExtensions.OptionsName("small"), o => o.Engine.MaxWaitingRequests = 9);
        using var sp = services.BuildServiceProvider();

        var main = sp.GetRequiredService<IChatClient>().GetService<AsyncLlmEngine>()!.Engine.Options;
        Assert.Equal((3, 128), (main.MaxWaitingRequests, main.MaxNumSeqs));
        var small = sp.GetRequiredKeyedService<IChatClient>("small");
        Assert.Equal("small", small.GetService<ChatClientMetadata>()!.DefaultModelId);
        var smallOptions = small.GetService<AsyncLlmEngine>()!.Engine.Options;
        Assert.Equal((9, 5), (smallOptions.MaxWaitingRequests, smallOptions.MaxNumSeqs));
    }

    [Fact]
    public void Options_without_a_model_fail_when_the_engine_is_resolved_with_the_option_named()
    {
        var services = new ServiceCollection();
        services.AddLocalVllm();
        using var sp = services.BuildServiceProvider();
        var e = Assert.Throws<InvalidOperationException>(() => sp.GetRequiredService<IChatClient>());
        Assert.Contains("LocalVllmOptions.Model is not set", e.Message);
    }

    [Fact]
    public async Task Pinned_system_prompts_are_pinned_when_the_engine_is_resolved()
    {
        var services = new ServiceCollection();
        services.AddLocalVllm(o => { o.Model = ModelDir; o.Engine.KvCacheMemoryBytes = 8L << 20; o.PinnedSystemPrompts = ["You are a careful assistant. " + new string('x', 80)]; });
        using var sp = services.BuildServiceProvider();
        var engine = sp.GetRequiredService<LocalVllmEngine>();
        var pin = Assert.Single(engine.PinnedSystemPromptIds);
        await engine.Engine.InvokeAsync(e =>
        {
            Assert.Equal([pin], e.PinnedPrefixIds);
            Assert.True(e.GetStats().KvBlocksPinned > 0);
        });
    }

    [Theory]
    [InlineData(ReasoningEffort.None, false)]
    [InlineData(ReasoningEffort.Low, true)]
    [InlineData(ReasoningEffort.High, true)]
    public async Task Reasoning_effort_switches_the_templates_thinking(ReasoningEffort effort, bool thinking)
    {
        var engine = new ScriptedEngine(["ok"]);
        await new LocalVllmChatClient(engine).GetResponseAsync(Hello, new ChatOptions { Reasoning = new ReasoningOptions { Effort = effort } });
        // Qwen3's template writes an empty think block into the generation prompt when thinking is off.
        Assert.Equal(!thinking, engine.Prompts[0].EndsWith("<|im_start|>assistant\n<think>\n\n</think>\n\n", StringComparison.Ordinal));
        Assert.EndsWith("<|im_start|>assistant\n" + (thinking ? "" : "<think>\n\n</think>\n\n"), engine.Prompts[0]);
    }

    [Fact]
    public async Task Reasoning_effort_and_enable_thinking_must_agree()
    {
        var client = new LocalVllmChatClient(new ScriptedEngine(["ok"]));
        var e = await Assert.ThrowsAsync<ArgumentException>(() => client.GetResponseAsync(Hello, new ChatOptions
        {
            Reasoning = new ReasoningOptions { Effort = ReasoningEffort.None },
            AdditionalProperties = new() { ["enable_thinking"] = true },
        }));
        Assert.Contains("contradicts", e.Message);
    }

    private static readonly string[] ThinkingScript = ["<think>", "\n", "Let", " me", " think", ".", "\n", "</think>", "\n\n", "Paris", "."];

    [Fact]
    public async Task Reasoning_tokens_are_counted_and_reasoning_output_none_drops_the_reasoning_text()
    {
        var full = await new LocalVllmChatClient(new ScriptedEngine(ThinkingScript)).GetResponseAsync(Hello);
        Assert.Equal("Paris.", full.Text);
        Assert.Equal("Let me think.", string.Concat(full.Messages[0].Contents.OfType<TextReasoningContent>().Select(c => c.Text)));
        // <think> through </think>: 8 of the 11 tokens; the answer's 3 (the newlines after </think> and "Paris.") are not.
        Assert.Equal(8, full.Usage!.ReasoningTokenCount);
        Assert.Equal(11, full.Usage.OutputTokenCount);

        var hidden = await new LocalVllmChatClient(new ScriptedEngine(ThinkingScript))
            .GetResponseAsync(Hello, new ChatOptions { Reasoning = new ReasoningOptions { Output = ReasoningOutput.None } });
        Assert.Equal("Paris.", hidden.Text);
        Assert.Empty(hidden.Messages[0].Contents.OfType<TextReasoningContent>());
        Assert.Equal(8, hidden.Usage!.ReasoningTokenCount);

        var plain = await new LocalVllmChatClient(new ScriptedEngine(["Paris", "."])).GetResponseAsync(Hello);
        Assert.Equal(0, plain.Usage!.ReasoningTokenCount);
    }

    [Fact]
    public async Task Enable_thinking_given_as_a_JsonElement_is_read()
    {
        using var doc = JsonDocument.Parse("""{"enable_thinking": false, "top_k": "5"}""");
        var engine = new ScriptedEngine(["ok"]);
        var options = new ChatOptions { AdditionalProperties = new() };
        foreach (var p in doc.RootElement.EnumerateObject()) options.AdditionalProperties[p.Name] = p.Value.Clone();
        await new LocalVllmChatClient(engine).GetResponseAsync(Hello, options);
        Assert.EndsWith("<think>\n\n</think>\n\n", engine.Prompts[0]);
        Assert.Equal(5, engine.Samplings[0].TopK);
    }

    [Fact]
    public void Unknown_keys_a_conversation_id_and_non_text_content_are_rejected_at_the_call_naming_what()
    {
        var client = new LocalVllmChatClient(new ScriptedEngine());
        var key = Assert.Throws<NotSupportedException>(() => client.GetStreamingResponseAsync(Hello, new ChatOptions { AdditionalProperties = new() { ["topk"] = 5 } }));
        Assert.Contains("AdditionalProperties[\"topk\"]", key.Message);
        Assert.Contains("top_k", key.Message); // and lists the keys that are read
        var conversation = Assert.Throws<NotSupportedException>(() => client.GetStreamingResponseAsync(Hello, new ChatOptions { ConversationId = "conv-1" }));
        Assert.Contains("ConversationId ('conv-1')", conversation.Message);
        ChatMessage[] withImage = [new(ChatRole.User, [new TextContent("What is this?"), new DataContent(new byte[] { 1, 2, 3 }, "image/png")])];
        var image = Assert.Throws<NotSupportedException>(() => client.GetStreamingResponseAsync(withImage));
        Assert.Contains("Message 0 (user) holds DataContent of media type 'image/png'", image.Message);
        ChatMessage[] withUri = [new(ChatRole.User, [new UriContent(new Uri("https://example.com/a.pdf"), "application/pdf")])];
        Assert.Contains("UriContent", Assert.Throws<NotSupportedException>(() => client.GetStreamingResponseAsync(withUri)).Message);
    }

    [Fact]
    public void Argument_errors_of_the_streaming_method_are_thrown_at_the_call()
    {
        var engine = new ScriptedEngine();
        var client = new LocalVllmChatClient(engine);
        Assert.Throws<ArgumentNullException>(() => client.GetStreamingResponseAsync(null!));
        Assert.Throws<ArgumentException>(() => client.GetStreamingResponseAsync([]));
        Assert.Throws<ArgumentNullException>(() => { _ = client.GetResponseAsync(null!); }); // thrown by the call, not by the task
        Assert.Empty(engine.Samplings); // nothing reached the engine
    }

    [Fact]
    public async Task Updates_carry_the_engine_output_as_raw_representation_and_one_message_id_unique_across_clients()
    {
        var engine = new ScriptedEngine(["Hel", "lo", "."], ["Hi", "."]);
        var updates = new List<ChatResponseUpdate>();
        await foreach (var u in new LocalVllmChatClient(engine).GetStreamingResponseAsync(Hello, new ChatOptions { AdditionalProperties = new() { ["logprobs"] = 2 } }))
            updates.Add(u);
        Assert.All(updates, u => Assert.IsType<RequestOutput>(u.RawRepresentation));
        Assert.Equal(["Hel", "lo", "."], updates.Take(3).Select(u => ((RequestOutput)u.RawRepresentation!).Outputs[0].Text));
        Assert.True(((RequestOutput)updates[^1].RawRepresentation!).Finished);
        Assert.Equal(2, engine.Samplings[0].Logprobs);
        var messageId = Assert.Single(updates.Select(u => u.MessageId).Distinct());

        var second = await new LocalVllmChatClient(engine).GetResponseAsync(Hello); // a second client: its own ids
        var raw = Assert.IsType<RequestOutput>(second.RawRepresentation);
        Assert.True(raw.Finished);
        Assert.NotEqual(messageId, second.Messages[0].MessageId);
        Assert.NotNull(second.Messages[0].MessageId);
    }

    [Fact]
    public async Task With_AllowMultipleToolCalls_false_only_the_first_call_is_returned()
    {
        string[] twoCalls = ["<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": {}}\n</tool_call>"];
        var tools = new List<AITool> { AIFunctionFactory.Create(() => 1, "a"), AIFunctionFactory.Create(() => 2, "b") };
        var both = await new LocalVllmChatClient(new ScriptedEngine(twoCalls)).GetResponseAsync(Hello, new ChatOptions { Tools = tools });
        Assert.Equal(["a", "b"], both.Messages[0].Contents.OfType<FunctionCallContent>().Select(c => c.Name));
        var one = await new LocalVllmChatClient(new ScriptedEngine(twoCalls)).GetResponseAsync(Hello, new ChatOptions { Tools = tools, AllowMultipleToolCalls = false });
        Assert.Equal(["a"], one.Messages[0].Contents.OfType<FunctionCallContent>().Select(c => c.Name));
        Assert.Equal(ChatFinishReason.ToolCalls, one.FinishReason);
    }

    [Fact]
    public void GetService_hands_out_wrapped_objects_by_exact_type_only()
    {
        var engine = new ScriptedEngine();
        var client = new LocalVllmChatClient(engine);
        Assert.Same(client, client.GetService(typeof(object)));
        Assert.Same(client, client.GetService<IChatClient>());
        Assert.Same(engine, client.GetService<ILocalVllmEngine>());
        Assert.Same(engine, client.GetService(typeof(ScriptedEngine)));
        Assert.Null(client.GetService<AsyncLlmEngine>()); // not a LocalVllmEngine: nothing behind it
        Assert.Null(client.GetService<ILocalVllmEngine>(serviceKey: "other"));
        Assert.Equal(new Uri("localvllm://localhost/scripted-qwen3"), client.GetService<ChatClientMetadata>()!.ProviderUri);
    }

    [Fact]
    public async Task The_rendered_prompt_is_logged_at_debug_level_with_its_length_and_head()
    {
        var logger = new ScriptedChatTests.ListLogger();
        var engine = new ScriptedEngine(["ok"]);
        await new LocalVllmChatClient(engine, logger).GetResponseAsync([new ChatMessage(ChatRole.System, new string('s', 500)), .. Hello]);
        var prompt = engine.Prompts[0];
        int tokens = engine.EncodeChatPrompt(prompt).Length;
        var entry = Assert.Single(logger.Entries, e => e.Level == LogLevel.Debug && e.Message.Contains("rendered prompt"));
        Assert.Contains($"rendered prompt of {tokens} tokens ({prompt.Length} characters) begins: {prompt[..LocalVllmChatClient.PromptHeadChars]}...", entry.Message);
    }
}
