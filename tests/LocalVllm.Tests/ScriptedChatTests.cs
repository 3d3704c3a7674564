using System.Text.Json;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.Logging;

namespace LocalVllm.Tests;

/// <summary>Options mapping, reasoning and tool-call parsing, through the scripted engine seam.</summary>
public sealed class ScriptedChatTests
{
    private static readonly ChatMessage[] Hello = [new(ChatRole.System, "You are terse."), new(ChatRole.User, "Hi")];

    [Fact]
    public async Task Options_map_onto_sampling_params_and_defaults_come_from_generation_config()
    {
        var engine = new ScriptedEngine(["ok"], ["ok"]);
        var client = new LocalVllmChatClient(engine);
        await client.GetResponseAsync(Hello, new ChatOptions
        {
            Temperature = 0.3f, TopP = 0.8f, TopK = 7, MaxOutputTokens = 33, StopSequences = ["END"], Seed = 42,
            FrequencyPenalty = 0.5f, PresencePenalty = 0.25f,
            AdditionalProperties = new() { ["min_p"] = 0.1, ["repetition_penalty"] = 1.2 },
        });
        var s = engine.Samplings[0];
        Assert.Equal((0.3f, 0.8f, 7, 33, 42L, 0.5f, 0.25f), (s.Temperature, s.TopP, s.TopK, s.MaxTokens, s.Seed!.Value, s.FrequencyPenalty, s.PresencePenalty));
        Assert.Equal(["END"], s.Stop);
        Assert.Equal(0.1f, s.MinP, 5);
        Assert.Equal(1.2f, s.RepetitionPenalty, 5);

        await client.GetResponseAsync(Hello);
        var d = engine.Samplings[1]; // Qwen3's generation_config.json: do_sample, temperature 0.6, top_k 20, top_p 0.95
        Assert.Equal((0.6f, 20, 0.95f), (d.Temperature, d.TopK, d.TopP));
    }

    [Theory]
    [InlineData("Temperature")]
    [InlineData("TopP")]
    [InlineData("MaxOutputTokens")]
    [InlineData("ModelId")]
    public async Task Invalid_options_are_rejected_naming_the_option(string option)
    {
        var client = new LocalVllmChatClient(new ScriptedEngine(["x"]));
        var o = option switch
        {
            "Temperature" => new ChatOptions { Temperature = -1 },
            "TopP" => new ChatOptions { TopP = 0 },
            "MaxOutputTokens" => new ChatOptions { MaxOutputTokens = 0 },
            _ => new ChatOptions { ModelId = "gpt-4o" },
        };
        var e = await Assert.ThrowsAnyAsync<ArgumentException>(() => client.GetResponseAsync(Hello, o));
        Assert.Contains(option, e.Message);
    }

    [Fact]
    public async Task Constraints_that_cannot_be_honoured_say_so_before_the_engine_sees_them()
    {
        var engine = new ScriptedEngine(["x"], ["x"]);
        var client = new LocalVllmChatClient(engine);
        var schema = JsonDocument.Parse("""{"type": "object", "not": {"required": ["a"]}}""").RootElement;
        var json = await Assert.ThrowsAsync<ArgumentException>(() => client.GetResponseAsync(Hello, new ChatOptions { ResponseFormat = ChatResponseFormat.ForJsonSchema(schema) }));
        Assert.Contains("'not'", json.Message);
        var tool = AIFunctionFactory.Create((string city) => "sunny", "get_weather");
        var req = await Assert.ThrowsAsync<ArgumentException>(() => client.GetResponseAsync(Hello, new ChatOptions { Tools = [tool], ToolMode = ChatToolMode.RequireSpecific("get_time") }));
        Assert.Contains("'get_time'", req.Message);
        await Assert.ThrowsAsync<ArgumentException>(() => client.GetResponseAsync([]));
    }

    [Fact]
    public async Task Instructions_tools_and_enable_thinking_reach_the_template()
    {
        var engine = new ScriptedEngine(["ok"]);
        var client = new LocalVllmChatClient(engine);
        var tool = AIFunctionFactory.Create((string city) => "sunny", "get_weather", "Get the weather.");
        await client.GetResponseAsync([new ChatMessage(ChatRole.User, "Weather in Paris?")], new ChatOptions
        {
            Instructions = "Be brief.", Tools = [tool], AdditionalProperties = new() { ["enable_thinking"] = false },
        });
        var prompt = engine.Prompts[0];
        // The schema MEAI derives from the delegate, rendered as the template's tojson writes it.
        const string toolJson = "{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Get the weather.\", " +
            "\"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}, \"required\": [\"city\"]}}}";
        Assert.Equal(
            "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n" +
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n" + toolJson + "\n</tools>\n\n" +
            "For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n" +
            "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" +
            "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", prompt);
    }

    /// <summary>
    /// Messages and a declared tool mapped from the fixture's tools case render exactly what transformers'
    /// apply_chat_template rendered for it (shared/fixtures/tiny-qwen3-chat, case "tools").
    /// </summary>
    [Fact]
    public async Task A_declared_tool_renders_exactly_as_transformers_renders_it()
    {
        var c = Fixtures.Reference("tiny-qwen3-chat")["cases"]!.AsArray().Single(x => x!["name"]!.GetValue<string>() == "tools")!;
        var messages = c["messages"]!.AsArray()
            .Select(m => new ChatMessage(new ChatRole(m!["role"]!.GetValue<string>()), m["content"]!.GetValue<string>())).ToList();
        var tools = c["tools"]!.AsArray().Select(t =>
        {
            var f = t!["function"]!;
            using var schema = JsonDocument.Parse(f["parameters"]!.ToJsonString());
            return (AITool)AIFunctionFactory.CreateDeclaration(f["name"]!.GetValue<string>(), f["description"]!.GetValue<string>(), schema.RootElement.Clone());
        }).ToList();
        var engine = new ScriptedEngine(["ok"]);
        await new LocalVllmChatClient(engine).GetResponseAsync(messages,
            new ChatOptions { Tools = tools, AdditionalProperties = new() { ["enable_thinking"] = c["enable_thinking"]!.GetValue<bool>() } });
        Assert.Equal(c["prompt_text"]!.GetValue<string>(), engine.Prompts[0]);
    }

    [Fact]
    public async Task Reasoning_is_returned_apart_from_the_answer()
    {
        var client = new LocalVllmChatClient(new ScriptedEngine(["<th", "ink>\n", "Let me", " think.\n", "</thi", "nk>\n\n", "Paris", "."]));
        var r = await client.GetResponseAsync(Hello);
        Assert.Equal("Paris.", r.Text);
        Assert.Equal("Let me think.", string.Concat(r.Messages[0].Contents.OfType<TextReasoningContent>().Select(c => c.Text)));
        Assert.Equal(ChatFinishReason.Stop, r.FinishReason);
    }

    public static TheoryData<string[]> ToolCallScripts => new()
    {
        new[] { "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>" },
        new[] { "<tool", "_call>\n{\"na", "me\": \"get_weather\", \"argu", "ments\": {\"city\": \"Par", "is\"}}\n</tool_", "call>" },
    };

    [Theory]
    [MemberData(nameof(ToolCallScripts))]
    public async Task A_tool_call_is_parsed_in_streaming_without_leaking_json(string[] script)
    {
        var client = new LocalVllmChatClient(new ScriptedEngine(script));
        var updates = new List<ChatResponseUpdate>();
        await foreach (var u in client.GetStreamingResponseAsync(Hello)) updates.Add(u);
        Assert.All(updates, u => Assert.DoesNotContain("{", u.Text));
        var call = Assert.Single(updates.SelectMany(u => u.Contents).OfType<FunctionCallContent>());
        Assert.Equal("get_weather", call.Name);
        Assert.Equal("Paris", ((JsonElement)call.Arguments!["city"]!).GetString());
        Assert.Equal(ChatFinishReason.ToolCalls, updates[^1].FinishReason);
    }

    [Fact]
    public async Task Several_tool_calls_in_one_turn_are_all_returned()
    {
        var script = new[] { "I'll check both.", "<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n", "<tool_call>\n{\"name\": \"b\", \"arguments\": {\"x\": 1}}\n</tool_call>" };
        var r = await new LocalVllmChatClient(new ScriptedEngine(script)).GetResponseAsync(Hello);
        Assert.Equal(["a", "b"], r.Messages[0].Contents.OfType<FunctionCallContent>().Select(c => c.Name));
        Assert.StartsWith("I'll check both.", r.Text);
        Assert.Equal(ChatFinishReason.ToolCalls, r.FinishReason);
    }

    [Fact]
    public async Task A_tool_call_with_unparsable_arguments_carries_the_error_to_the_function_invoking_client()
    {
        var logger = new ListLogger();
        var engine = new ScriptedEngine(["<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {oops}\n</tool_call>"], ["Sorry."]);
        var r = await new LocalVllmChatClient(engine, logger).GetResponseAsync(Hello);
        var call = Assert.Single(r.Messages[0].Contents.OfType<FunctionCallContent>());
        Assert.Equal("get_weather", call.Name);
        Assert.IsType<JsonException>(Assert.IsType<InvalidOperationException>(call.Exception).InnerException);
        Assert.Equal(ChatFinishReason.ToolCalls, r.FinishReason);
        Assert.Equal("", r.Text);
        Assert.Contains(logger.Entries, e => e.Level == LogLevel.Warning && e.Message.Contains("do not parse"));

        // Through FunctionInvokingChatClient the model gets an error as the tool result and answers again; the function
        // never runs (10.11 tries to bind the missing arguments and reports that failure).
        int invoked = 0;
        var tool = AIFunctionFactory.Create((string city) => { invoked++; return "sunny"; }, "get_weather");
        engine = new ScriptedEngine(["<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {oops}\n</tool_call>"], ["Sorry."]);
        using var client = new ChatClientBuilder(new LocalVllmChatClient(engine)).UseFunctionInvocation(configure: f => f.IncludeDetailedErrors = true).Build();
        var final = await client.GetResponseAsync([new ChatMessage(ChatRole.User, "Weather?")], new ChatOptions { Tools = [tool] });
        Assert.Equal(0, invoked);
        Assert.Equal("Sorry.", final.Text);
        Assert.Contains("<tool_response>\nError: ", engine.Prompts[1]);
        Assert.Contains("Function failed", engine.Prompts[1]);
    }

    [Fact]
    public async Task A_tool_call_naming_no_function_stays_text_with_a_warning()
    {
        var logger = new ListLogger();
        var client = new LocalVllmChatClient(new ScriptedEngine(["<tool_call>\n{oops, no name}\n</tool_call>"]), logger);
        var r = await client.GetResponseAsync(Hello);
        Assert.Empty(r.Messages[0].Contents.OfType<FunctionCallContent>());
        Assert.Equal("<tool_call>\n{oops, no name}\n</tool_call>", r.Text);
        Assert.Equal(ChatFinishReason.Stop, r.FinishReason);
        Assert.Contains(logger.Entries, e => e.Level == LogLevel.Warning && e.Message.Contains("malformed tool call"));
    }

    [Fact]
    public async Task Function_invocation_round_trip_renders_the_tool_result_back()
    {
        var engine = new ScriptedEngine(
            ["<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"],
            ["It is ", "sunny."]);
        int invoked = 0;
        var tool = AIFunctionFactory.Create((string city) => { invoked++; return $"sunny in {city}"; }, "get_weather");
        using var client = new ChatClientBuilder(new LocalVllmChatClient(engine)).UseFunctionInvocation().Build();
        var r = await client.GetResponseAsync([new ChatMessage(ChatRole.User, "Weather?")], new ChatOptions { Tools = [tool] });
        Assert.Equal(1, invoked);
        Assert.Equal("It is sunny.", r.Text);
        Assert.Contains("<tool_response>\nsunny in Paris\n</tool_response>", engine.Prompts[1]);
        Assert.Contains("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>", engine.Prompts[1]);
    }

    [Fact]
    public async Task A_tool_result_for_an_unknown_call_id_is_rejected()
    {
        var client = new LocalVllmChatClient(new ScriptedEngine(["x"]));
        var e = await Assert.ThrowsAsync<ArgumentException>(() => client.GetResponseAsync(
            [new ChatMessage(ChatRole.User, "hi"), new ChatMessage(ChatRole.Tool, [new FunctionResultContent("nope", "x")])]));
        Assert.Contains("nope", e.Message);
    }

    [Fact]
    public void GetService_returns_metadata_and_the_engine()
    {
        var engine = new ScriptedEngine();
        var client = new LocalVllmChatClient(engine);
        var meta = client.GetService<ChatClientMetadata>()!;
        Assert.Equal("localvllm", meta.ProviderName);
        Assert.Equal("scripted-qwen3", meta.DefaultModelId);
        Assert.Same(engine, client.GetService<ILocalVllmEngine>());
    }

    internal sealed class ListLogger : ILogger<LocalVllmChatClient>
    {
        public List<(LogLevel Level, string Message)> Entries { get; } = [];
        public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;
        public bool IsEnabled(LogLevel logLevel) => true;
        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter) =>
            Entries.Add((logLevel, formatter(state, exception)));
    }
}

