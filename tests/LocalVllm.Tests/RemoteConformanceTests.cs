using LocalVllm.Engine;
using LocalVllm.Server;
using Microsoft.Extensions.AI;

namespace LocalVllm.Tests;

/// <summary>
/// The provider's conformance checks again, through HTTP: the server runs over the scripted engine seam (so the model
/// calls tools when the test says so) and the remote-mode client talks to it.
/// </summary>
public sealed class RemoteConformanceTests
{
    private static async Task<(LocalVllmServer Server, IChatClient Client)> Start(ScriptedEngine engine)
    {
        var server = LocalVllmServer.CreateOverChatEngine(new ServerOptions { Model = "scripted", Port = 0 }, engine);
        await server.StartAsync();
        return (server, new RemoteChatClient(new Uri(server.BaseAddress, "v1"), engine.ModelId));
    }

    [Fact]
    public async Task A_function_invocation_round_trip_over_HTTP_renders_the_tool_result_and_sums_the_usage()
    {
        var engine = new ScriptedEngine(
            ["<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"],
            ["It is ", "sunny", "."]);
        var (server, remote) = await Start(engine);
        await using var _ = server;
        int invoked = 0;
        var tool = AIFunctionFactory.Create((string city) => { invoked++; return $"sunny in {city}"; }, "get_weather");
        using var client = new ChatClientBuilder(remote).UseFunctionInvocation().Build();
        var response = await client.GetResponseAsync([new ChatMessage(ChatRole.User, "Weather in Paris?")], new ChatOptions { Tools = [tool] });

        Assert.Equal(1, invoked);
        Assert.Equal("It is sunny.", response.Text);
        Assert.Equal(2, engine.Prompts.Count);
        // Microsoft.Extensions.AI.OpenAI sends a function's result JSON-serialized (a string arrives quoted); the
        // server renders the tool message as the client sent it.
        Assert.Contains("<tool_response>\n\"sunny in Paris\"\n</tool_response>", engine.Prompts[1]);
        Assert.Contains("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>", engine.Prompts[1]);
        var tokenizer = new ScriptedEngine();
        long input = engine.Prompts.Sum(p => (long)tokenizer.EncodeChatPrompt(p).Length);
        Assert.Equal(input, response.Usage!.InputTokenCount);
        Assert.Equal(1 + 3, response.Usage.OutputTokenCount);
        Assert.Equal(2 * 16, response.Usage.CachedInputTokenCount);
    }

    [Fact]
    public async Task A_stream_over_HTTP_has_one_usage_whose_totals_add_up_and_equals_the_non_streamed_response()
    {
        var engine = new ScriptedEngine(["Par", "is", "."], ["Par", "is", "."]);
        var (server, client) = await Start(engine);
        await using var _ = server;
        ChatMessage[] question = [new(ChatRole.User, "Capital of France?")];
        var updates = new List<ChatResponseUpdate>();
        await foreach (var u in client.GetStreamingResponseAsync(question)) updates.Add(u);
        var usage = Assert.Single(updates.SelectMany(u => u.Contents).OfType<UsageContent>()).Details;
        Assert.Equal(3, usage.OutputTokenCount);
        Assert.Equal(usage.InputTokenCount + usage.OutputTokenCount, usage.TotalTokenCount);
        var streamed = updates.ToChatResponse();
        var whole = await client.GetResponseAsync(question);
        Assert.Equal("Paris.", whole.Text);
        Assert.Equal(whole.Text, streamed.Text);
        Assert.Equal(whole.FinishReason, streamed.FinishReason);
        Assert.Equal((whole.Usage!.InputTokenCount, whole.Usage.OutputTokenCount, whole.Usage.CachedInputTokenCount),
            (streamed.Usage!.InputTokenCount, streamed.Usage.OutputTokenCount, streamed.Usage.CachedInputTokenCount));
    }

    [Fact]
    public async Task A_stream_with_n_3_carries_each_completion_under_its_index()
    {
        var engine = new ScriptedEngine(["A", "a"], ["B", "b", "b"], ["C"]);
        var (server, _) = await Start(engine);
        await using var __ = server;
        using var http = new HttpClient { BaseAddress = server.BaseAddress };
        var body = new System.Text.Json.Nodes.JsonObject
        {
            ["messages"] = new System.Text.Json.Nodes.JsonArray { new System.Text.Json.Nodes.JsonObject { ["role"] = "user", ["content"] = "Go" } },
            ["n"] = 3, ["stream"] = true, ["stream_options"] = new System.Text.Json.Nodes.JsonObject { ["include_usage"] = true },
        };
        using var response = await http.PostAsync("v1/chat/completions", new StringContent(body.ToJsonString(), System.Text.Encoding.UTF8, "application/json"));
        var events = (await response.Content.ReadAsStringAsync()).Split("\n\n", StringSplitOptions.RemoveEmptyEntries);
        Assert.Equal("data: [DONE]", events[^1]);
        var chunks = events[..^1].Select(e => System.Text.Json.Nodes.JsonNode.Parse(e["data: ".Length..])!).ToList();
        var texts = new string[3];
        var finishes = new List<int>();
        foreach (var choice in chunks.SelectMany(c => c["choices"]!.AsArray()))
        {
            int index = choice!["index"]!.GetValue<int>();
            texts[index] += choice["delta"]!["content"]?.GetValue<string>() ?? "";
            if (choice["finish_reason"] is { } f && f.GetValue<string>() is not null) finishes.Add(index);
        }
        // The scripted engine hands out its scripts in the order the three requests reached it.
        Assert.Equal(["Aa", "Bbb", "C"], texts.Order());
        Assert.Equal([0, 1, 2], finishes.Order());
        Assert.Equal(2 + 3 + 1, chunks[^1]["usage"]!["completion_tokens"]!.GetValue<int>());
    }

    [Fact]
    public async Task Reasoning_comes_back_as_reasoning_content_over_HTTP()
    {
        var engine = new ScriptedEngine(["<think>", "\n", "Let", " me", " think", ".", "\n", "</think>", "\n\n", "Paris", "."]);
        var (server, _) = await Start(engine);
        await using var __ = server;
        using var http = new HttpClient { BaseAddress = server.BaseAddress };
        var body = new System.Text.Json.Nodes.JsonObject
        {
            ["messages"] = new System.Text.Json.Nodes.JsonArray { new System.Text.Json.Nodes.JsonObject { ["role"] = "user", ["content"] = "Capital of France?" } },
        };
        using var response = await http.PostAsync("v1/chat/completions", new StringContent(body.ToJsonString(), System.Text.Encoding.UTF8, "application/json"));
        var message = System.Text.Json.Nodes.JsonNode.Parse(await response.Content.ReadAsStringAsync())!["choices"]![0]!["message"]!;
        Assert.Equal("Paris.", message["content"]!.GetValue<string>());
        Assert.Equal("Let me think.", message["reasoning_content"]!.GetValue<string>());
    }

    [Fact]
    public async Task Logit_bias_travels_to_the_server_in_openais_shape()
    {
        var engine = new ScriptedEngine(["ok"]);
        var (server, remote) = await Start(engine);
        await using var _ = server;
        var options = new ChatOptions { AdditionalProperties = new() { ["logit_bias"] = new Dictionary<int, float> { [42] = 5.5f, [7] = -100 } } };
        await remote.GetResponseAsync([new ChatMessage(ChatRole.User, "Hi")], options);
        var bias = Assert.Single(engine.Samplings).LogitBias!;
        Assert.Equal(new Dictionary<int, float> { [42] = 5.5f, [7] = -100 }, bias.ToDictionary());
    }

    public static TheoryData<string> Constraints => ["schema", "schema-flexible", "object", "regex", "choice", "grammar", "vllm-json"];

    private static object Constraint(string name) => name switch
    {
        "schema" => StructuredOutputs.ForJsonSchema("""{"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}"""),
        "schema-flexible" => StructuredOutputs.ForJsonSchema("""{"type": "array", "items": {"type": "string"}}""", JsonWhitespace.Flexible),
        "object" => StructuredOutputs.ForJsonObject(),
        "regex" => StructuredOutputs.ForRegex("(yes|no), [0-9]{2}"),
        "choice" => StructuredOutputs.ForChoice("red", "green", "blue"),
        "grammar" => StructuredOutputs.ForGrammar("root ::= \"a\" %json{\"type\": \"boolean\"}"),
        _ => System.Text.Json.Nodes.JsonNode.Parse("""{"choice": ["x", "y"]}""")!, // vLLM's object as JSON, as settings files give it
    };

    [Theory]
    [MemberData(nameof(Constraints))]
    public async Task Structured_outputs_reach_the_server_as_the_same_constraint_the_in_process_client_would_apply(string name)
    {
        var engine = new ScriptedEngine(["ok"]);
        var (server, remote) = await Start(engine);
        await using var _ = server;
        var options = new ChatOptions { AdditionalProperties = new() { ["structured_outputs"] = Constraint(name) } };
        await remote.GetResponseAsync([new ChatMessage(ChatRole.User, "Hi")], options);
        // The same request in-process, on an engine of the same script: the constraint its sampling carries.
        var local = new ScriptedEngine(["ok"]);
        await new LocalVllmChatClient(local).GetResponseAsync([new ChatMessage(ChatRole.User, "Hi")], options);
        var expected = Assert.Single(local.Samplings).StructuredOutputs!;
        var received = Assert.Single(engine.Samplings).StructuredOutputs!;
        Assert.Equal((expected.Kind, expected.Regex, expected.Grammar, expected.JsonObject, expected.Whitespace, expected.StrictJson, expected.ReasoningEnd),
            (received.Kind, received.Regex, received.Grammar, received.JsonObject, received.Whitespace, received.StrictJson, received.ReasoningEnd));
        Assert.Equal(expected.Choice, received.Choice);
        // A schema travels as a JSON object: the same schema, not necessarily the same spacing.
        Assert.True(System.Text.Json.Nodes.JsonNode.DeepEquals(Parsed(expected.Json), Parsed(received.Json)), $"{expected.Json} against {received.Json}");
    }

    private static System.Text.Json.Nodes.JsonNode? Parsed(string? json) => json is null ? null : System.Text.Json.Nodes.JsonNode.Parse(json);

    [Fact]
    public async Task A_constraint_that_vllms_fields_cannot_carry_is_refused_by_name_before_anything_is_sent()
    {
        var engine = new ScriptedEngine(["ok"]);
        var (server, remote) = await Start(engine);
        await using var _ = server;
        var loose = new ChatOptions { AdditionalProperties = new() { ["structured_outputs"] = StructuredOutputs.ForJsonObject() with { StrictJson = false } } };
        var e = await Assert.ThrowsAsync<NotSupportedException>(() => remote.GetResponseAsync([new ChatMessage(ChatRole.User, "Hi")], loose));
        Assert.Contains("StrictJson", e.Message);
        var two = new ChatOptions { AdditionalProperties = new() { ["structured_outputs"] = new StructuredOutputs { Regex = "a", Choice = ["a"] } } };
        var e2 = await Assert.ThrowsAsync<ArgumentException>(() => remote.GetResponseAsync([new ChatMessage(ChatRole.User, "Hi")], two));
        Assert.Contains("exactly one", e2.Message);
        Assert.Empty(engine.Samplings);
    }
}
