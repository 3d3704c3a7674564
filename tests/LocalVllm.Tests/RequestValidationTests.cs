using LocalVllm.Engine;
using Microsoft.Extensions.AI;

namespace LocalVllm.Tests;

/// <summary>
/// One set of request rules: a bad value is refused with the same exception type and message through the offline
/// API (<see cref="Llm"/>), the async engine and the chat client, and nothing is queued.
/// </summary>
public sealed class RequestValidationTests(RequestValidationTests.Engines engines) : IClassFixture<RequestValidationTests.Engines>
{
    private static EngineOptions Options() => new() { Model = Fixtures.Model("tiny-qwen3-chat"), KvCacheMemoryBytes = 16L << 20 };

    /// <summary>One offline engine and one async engine, shared by the cases (each case leaves them idle).</summary>
    public sealed class Engines : IDisposable
    {
        public Llm Llm { get; } = new(Options());
        public LocalVllmEngine Async { get; } = new(Options());
        public void Dispose()
        {
            Llm.Dispose();
            Async.Dispose();
        }
    }

    /// <summary>Each bad value as engine sampling parameters and as the chat options that map onto them (null: no chat option for it).</summary>
    public static TheoryData<string, SamplingParams, ChatOptions?> BadValues() => new()
    {
        { "Temperature", new SamplingParams { Temperature = -0.5f }, new ChatOptions { Temperature = -0.5f } },
        { "TopP zero", new SamplingParams { TopP = 0 }, new ChatOptions { TopP = 0 } },
        { "TopP over one", new SamplingParams { TopP = 1.5f }, new ChatOptions { TopP = 1.5f } },
        { "TopK", new SamplingParams { TopK = -2 }, new ChatOptions { TopK = -2 } },
        { "MinP", new SamplingParams { MinP = 2 }, new ChatOptions { AdditionalProperties = new() { ["min_p"] = 2.0 } } },
        { "RepetitionPenalty", new SamplingParams { RepetitionPenalty = 0 }, new ChatOptions { AdditionalProperties = new() { ["repetition_penalty"] = 0.0 } } },
        { "PresencePenalty", new SamplingParams { PresencePenalty = 3 }, new ChatOptions { PresencePenalty = 3 } },
        { "FrequencyPenalty", new SamplingParams { FrequencyPenalty = -3 }, new ChatOptions { FrequencyPenalty = -3 } },
        { "MaxTokens", new SamplingParams { MaxTokens = 0 }, new ChatOptions { MaxOutputTokens = 0 } },
        { "MinTokens", new SamplingParams { MaxTokens = 4, MinTokens = 5 }, new ChatOptions { MaxOutputTokens = 4, AdditionalProperties = new() { ["min_tokens"] = 5 } } },
        { "Stop", new SamplingParams { Stop = [""] }, new ChatOptions { StopSequences = [""] } },
        { "N", new SamplingParams { N = 0 }, null },
        { "Logprobs", new SamplingParams { Logprobs = -1 }, null },
        { "PromptLogprobs", new SamplingParams { PromptLogprobs = 1_000_000 }, null },
        { "Logprobs over MaxLogprobs", new SamplingParams { Logprobs = 21 }, new ChatOptions { AdditionalProperties = new() { ["logprobs"] = 21 } } },
        { "StopTokenIds", new SamplingParams { StopTokenIds = [-1] }, null },
        { "OutputKind", new SamplingParams { OutputKind = (RequestOutputKind)7 }, null },
    };

    [Theory]
    [MemberData(nameof(BadValues))]
    public async Task A_bad_value_gets_the_same_message_on_every_path(string name, SamplingParams bad, ChatOptions? chat)
    {
        var llm = engines.Llm;
        int[] prompt = [1, 2, 3];
        var direct = Assert.ThrowsAny<ArgumentException>(() => llm.Generate([prompt], bad));
        Assert.False(llm.Engine.HasUnfinishedRequests, name);
        // The message names the field (by its engine name) and its allowed range.
        Assert.Contains(name.Split(' ')[0], direct.Message);

        var engine = engines.Async;
        var viaAsync = await Assert.ThrowsAnyAsync<ArgumentException>(async () =>
        {
            await foreach (var _ in engine.Engine.GenerateAsync(prompt, bad)) { }
        });
        Assert.Equal(direct.GetType(), viaAsync.GetType());
        Assert.Equal(direct.Message, viaAsync.Message);

        if (chat is not null)
        {
            var client = new LocalVllmChatClient(engine);
            chat.AdditionalProperties ??= [];
            chat.AdditionalProperties["enable_thinking"] = false;
            var viaChat = await Assert.ThrowsAnyAsync<ArgumentException>(() => client.GetResponseAsync([new ChatMessage(ChatRole.User, "hi")], chat));
            Assert.Equal(direct.GetType(), viaChat.GetType());
            Assert.Equal(direct.Message, viaChat.Message);
        }
        await engine.Engine.InvokeAsync(e =>
        {
            Assert.False(e.HasUnfinishedRequests);
            e.Blocks.CheckInvariants(expectAllFree: true);
        });
    }

    [Fact]
    public async Task A_bad_prompt_gets_the_same_message_from_the_offline_api_and_the_async_engine()
    {
        var llm = engines.Llm;
        var engine = engines.Async;
        int vocab = llm.Engine.Model.Config.VocabSize, context = llm.Engine.MaxModelLen;
        foreach (var prompt in new[] { [], [1, vocab], Enumerable.Repeat(5, context).ToArray() })
        {
            var direct = Assert.ThrowsAny<ArgumentException>(() => llm.Generate([prompt], new SamplingParams()));
            var viaAsync = await Assert.ThrowsAnyAsync<ArgumentException>(async () =>
            {
                await foreach (var _ in engine.Engine.GenerateAsync(prompt)) { }
            });
            Assert.Equal(direct.Message, viaAsync.Message);
            Assert.Equal(direct.Message, Assert.ThrowsAny<ArgumentException>(() => llm.Engine.Validator.ValidatePrompt(prompt)).Message);
        }
    }

    [Fact]
    public void TopK_minus_one_means_disabled_on_every_path()
    {
        var llm = engines.Llm;
        var disabled = llm.Generate([[1, 2, 3]], new SamplingParams { Temperature = 0, TopK = -1, MaxTokens = 3, IgnoreEos = true })[0];
        var plain = llm.Generate([[1, 2, 3]], new SamplingParams { Temperature = 0, MaxTokens = 3, IgnoreEos = true })[0];
        Assert.Equal(plain.Outputs[0].TokenIds, disabled.Outputs[0].TokenIds);
        // The chat mapping passes -1 through rather than refusing it with rules of its own.
        Assert.Equal(-1, ChatRequestMapper.ToSampling(new ChatOptions { TopK = -1 }, llm.Engine.Directory.Generation, 3, 100).TopK);
    }

    [Theory]
    [InlineData("top_k", "abc", "an integer")]
    [InlineData("min_p", "lots", "a number")]
    [InlineData("enable_thinking", "maybe", "true or false")]
    [InlineData("ignore_eos", 3, "true or false")]
    public async Task A_malformed_additional_property_is_named_with_what_is_allowed(string key, object value, string allowed)
    {
        var client = new LocalVllmChatClient(engines.Async);
        var e = await Assert.ThrowsAnyAsync<ArgumentException>(() => client.GetResponseAsync([new ChatMessage(ChatRole.User, "hi")],
            new ChatOptions { AdditionalProperties = new() { [key] = value } }));
        Assert.Contains($"AdditionalProperties[\"{key}\"]", e.Message);
        Assert.Contains(value.ToString()!, e.Message);
        Assert.Contains(allowed, e.Message);
    }

    [Fact]
    public async Task Additional_properties_loaded_from_json_arrive_as_their_values()
    {
        var client = new LocalVllmChatClient(engines.Async);
        var settings = System.Text.Json.JsonDocument.Parse("""{ "enable_thinking": false, "ignore_eos": true, "top_k": 1, "min_tokens": 2 }""").RootElement;
        var options = new ChatOptions { Temperature = 0, MaxOutputTokens = 3, AdditionalProperties = [] };
        foreach (var p in settings.EnumerateObject()) options.AdditionalProperties[p.Name] = p.Value.Clone();
        var r = await client.GetResponseAsync([new ChatMessage(ChatRole.User, "hi")], options);
        Assert.Equal(3, r.Usage!.OutputTokenCount); // ignore_eos true: all three tokens
        var sampling = ChatRequestMapper.ToSampling(options, engines.Llm.Engine.Directory.Generation, 3, 100);
        Assert.Equal((1, 2, true), (sampling.TopK, sampling.MinTokens, sampling.IgnoreEos));
    }

    [Fact]
    public async Task A_null_message_in_the_list_is_named_by_its_position()
    {
        var client = new LocalVllmChatClient(engines.Async);
        var e = await Assert.ThrowsAnyAsync<ArgumentException>(() => client.GetResponseAsync([new ChatMessage(ChatRole.User, "hi"), null!]));
        Assert.Contains("Message 1 of the list is null", e.Message);
    }

    /// <summary>Log-probabilities are capped at vLLM's max_logprobs (20) by default, the message names the setting, and -1 lifts the cap.</summary>
    [Fact]
    public void Logprobs_are_capped_at_max_logprobs_which_the_message_names()
    {
        var e = Assert.Throws<ArgumentOutOfRangeException>(() => engines.Llm.Engine.Validator.Validate([1, 2], new SamplingParams { Logprobs = 21 }));
        Assert.Contains("must be in [0, 20: EngineOptions.MaxLogprobs (--max-logprobs)]", e.Message);
        engines.Llm.Engine.Validator.Validate([1, 2], new SamplingParams { Logprobs = 20, PromptLogprobs = 20 });
        var uncapped = new RequestValidator(1000, 64, 8, 16, maxLogprobs: -1);
        uncapped.Validate([1, 2], new SamplingParams { Logprobs = 1000 });
        Assert.Contains("vocabulary size 1000", Assert.Throws<ArgumentOutOfRangeException>(() => uncapped.Validate([1, 2], new SamplingParams { Logprobs = 1001 })).Message);
    }
}
