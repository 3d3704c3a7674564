using System.ClientModel;
using System.Net;
using System.Text;
using System.Text.Json.Nodes;
using LocalVllm.Server;
using Microsoft.Extensions.AI;
using OpenAI.Responses;

#pragma warning disable OPENAI001 // the SDK marks its Responses client as evaluation-only; it is the client these tests drive the endpoint with

namespace LocalVllm.Tests;

/// <summary>
/// OpenAI's Responses API (<c>POST /v1/responses</c>) on the real server: over raw HTTP against the fixture's reference
/// continuation and the chat completion of the same conversation, and through the official OpenAI SDK's
/// <see cref="ResponsesClient"/> under Microsoft.Extensions.AI (its <c>AsIChatClient</c>), including a tool round
/// trip with <c>FunctionInvokingChatClient</c> on the scripted engine seam.
/// </summary>
public sealed class ResponsesApiTests(ServerFixture fixture) : IClassFixture<ServerFixture>
{
    private static readonly JsonNode Case0 = Fixtures.Reference("tiny-qwen3-chat")["cases"]![0]!;

    private async Task<(HttpStatusCode Status, JsonObject Body)> Post(string path, JsonObject body)
    {
        var response = await fixture.Http.PostAsync(path, new StringContent(body.ToJsonString(), Encoding.UTF8, "application/json"));
        return (response.StatusCode, (JsonObject)JsonNode.Parse(await response.Content.ReadAsStringAsync())!);
    }

    /// <summary>The fixture's first conversation as Responses input: the system message as <c>instructions</c>, the rest as message items.</summary>
    private static JsonObject GreedyResponse(int maxTokens)
    {
        var messages = Case0["messages"]!.AsArray();
        return new JsonObject
        {
            ["model"] = "tiny-qwen3-chat",
            ["instructions"] = messages[0]!["content"]!.DeepClone(),
            ["input"] = new JsonArray(messages.Skip(1).Select(m => (JsonNode?)new JsonObject
            {
                ["type"] = "message", ["role"] = m!["role"]!.DeepClone(),
                ["content"] = new JsonArray(new JsonObject { ["type"] = "input_text", ["text"] = m["content"]!.DeepClone() }),
            }).ToArray()),
            ["temperature"] = 0, ["max_output_tokens"] = maxTokens, ["ignore_eos"] = true,
            ["chat_template_kwargs"] = new JsonObject { ["enable_thinking"] = false },
        };
    }

    private static string OutputText(JsonObject response) => string.Concat(response["output"]!.AsArray()
        .Where(i => i!["type"]!.GetValue<string>() == "message")
        .SelectMany(i => i!["content"]!.AsArray()).Select(p => p!["text"]!.GetValue<string>()));

    [Fact]
    public async Task A_response_gives_the_reference_greedy_continuation_with_usage_and_cached_tokens()
    {
        var greedy = Fixtures.Ints(Case0["greedy_ids"]);
        var tokenizer = fixture.Server.Engine.Engine.Engine.Tokenizer!;
        var (status, body) = await Post("v1/responses", GreedyResponse(greedy.Length));
        Assert.True(status == HttpStatusCode.OK, body.ToJsonString());
        Assert.Equal("response", body["object"]!.GetValue<string>());
        Assert.StartsWith("resp_", body["id"]!.GetValue<string>());
        Assert.Equal(tokenizer.Decode(greedy), OutputText(body));
        // Ended by max_output_tokens: incomplete, with the reason.
        Assert.Equal("incomplete", body["status"]!.GetValue<string>());
        Assert.Equal("max_output_tokens", body["incomplete_details"]!["reason"]!.GetValue<string>());
        Assert.False(body["store"]!.GetValue<bool>());
        int promptTokens = Fixtures.Ints(Case0["prompt_ids"]).Length;
        Assert.Equal(promptTokens, body["usage"]!["input_tokens"]!.GetValue<int>());
        Assert.Equal(greedy.Length, body["usage"]!["output_tokens"]!.GetValue<int>());
        Assert.Equal(promptTokens + greedy.Length, body["usage"]!["total_tokens"]!.GetValue<int>());
        Assert.Equal(greedy.Length, body["max_output_tokens"]!.GetValue<int>());
        Assert.Equal("You are a helpful assistant.", body["instructions"]!.GetValue<string>());

        var (_, again) = await Post("v1/responses", GreedyResponse(greedy.Length));
        Assert.Equal((promptTokens - 1) / 16 * 16, again["usage"]!["input_tokens_details"]!["cached_tokens"]!.GetValue<int>());
        Assert.Equal(OutputText(body), OutputText(again));
    }

    /// <summary>Reads a streamed response's events: (event line's type, data).</summary>
    private async Task<List<(string Event, JsonObject Data)>> Stream(JsonObject request)
    {
        request["stream"] = true;
        using var message = new HttpRequestMessage(HttpMethod.Post, "v1/responses") { Content = new StringContent(request.ToJsonString(), Encoding.UTF8, "application/json") };
        using var response = await fixture.Http.SendAsync(message, HttpCompletionOption.ResponseHeadersRead);
        Assert.Equal(HttpStatusCode.OK, response.StatusCode);
        Assert.Equal("text/event-stream", response.Content.Headers.ContentType!.MediaType);
        var events = new List<(string, JsonObject)>();
        using var reader = new StreamReader(await response.Content.ReadAsStreamAsync());
        string? type = null;
        while (await reader.ReadLineAsync() is { } line)
        {
            if (line.StartsWith("event: ", StringComparison.Ordinal)) type = line[7..];
            else if (line.StartsWith("data: ", StringComparison.Ordinal))
            {
                Assert.NotNull(type);
                events.Add((type!, (JsonObject)JsonNode.Parse(line[6..])!));
                type = null;
            }
        }
        return events;
    }

    [Fact]
    public async Task Streamed_events_come_in_order_and_rebuild_the_response_given_without_streaming()
    {
        var whole = (await Post("v1/responses", GreedyResponse(12))).Body;
        var events = await Stream(GreedyResponse(12));

        Assert.All(events, e => Assert.Equal(e.Event, e.Data["type"]!.GetValue<string>()));
        Assert.Equal(Enumerable.Range(0, events.Count), events.Select(e => e.Data["sequence_number"]!.GetValue<int>()));
        Assert.Equal(["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"], events.Take(4).Select(e => e.Event));
        Assert.Equal(["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.incomplete"], events.TakeLast(4).Select(e => e.Event));
        Assert.All(events.Skip(4).SkipLast(4), e => Assert.Equal("response.output_text.delta", e.Event));
        Assert.Equal("in_progress", events[0].Data["response"]!["status"]!.GetValue<string>());

        // The deltas add up to the text; the last event carries the same response as the non-streamed call.
        var itemId = events[2].Data["item"]!["id"]!.GetValue<string>();
        Assert.All(events.Where(e => e.Event == "response.output_text.delta"), e => Assert.Equal(itemId, e.Data["item_id"]!.GetValue<string>()));
        string text = string.Concat(events.Where(e => e.Event == "response.output_text.delta").Select(e => e.Data["delta"]!.GetValue<string>()));
        Assert.Equal(OutputText(whole), text);
        Assert.Equal(text, events[^4].Data["text"]!.GetValue<string>());
        var final = (JsonObject)events[^1].Data["response"]!;
        Assert.Equal(OutputText(whole), OutputText(final));
        Assert.Equal(itemId, final["output"]![0]!["id"]!.GetValue<string>());
        Assert.Equal(whole["usage"]!["output_tokens"]!.GetValue<int>(), final["usage"]!["output_tokens"]!.GetValue<int>());
        Assert.Equal(whole["usage"]!["input_tokens"]!.GetValue<int>(), final["usage"]!["input_tokens"]!.GetValue<int>());
        Assert.Equal("incomplete", final["status"]!.GetValue<string>());
    }

    [Fact]
    public async Task Output_text_logprobs_equal_the_chat_completions_for_the_same_conversation()
    {
        var request = GreedyResponse(6);
        request["include"] = new JsonArray("message.output_text.logprobs");
        request["top_logprobs"] = 2;
        var (status, body) = await Post("v1/responses", request);
        Assert.True(status == HttpStatusCode.OK, body.ToJsonString());
        var logprobs = body["output"]![0]!["content"]![0]!["logprobs"]!.AsArray();

        var chat = new JsonObject
        {
            ["model"] = "tiny-qwen3-chat", ["messages"] = Case0["messages"]!.DeepClone(), ["temperature"] = 0, ["max_tokens"] = 6, ["ignore_eos"] = true,
            ["chat_template_kwargs"] = new JsonObject { ["enable_thinking"] = false }, ["logprobs"] = true, ["top_logprobs"] = 2,
        };
        var (_, completion) = await Post("v1/chat/completions", chat);
        var expected = completion["choices"]![0]!["logprobs"]!["content"]!.AsArray();
        Assert.Equal(6, expected.Count);
        Assert.Equal(expected.ToJsonString(), logprobs.ToJsonString());
        Assert.All(logprobs, p => Assert.Equal(2, p!["top_logprobs"]!.AsArray().Count));
        Assert.Equal(OutputText(body), string.Concat(logprobs.Select(p => p!["token"]!.GetValue<string>())));
    }

    private IChatClient SdkClient() =>
        new ResponsesClient(new ApiKeyCredential(ServerFixture.ApiKey), new ResponsesClientOptions { Endpoint = new Uri(fixture.Server.BaseAddress, "v1") })
            .AsIChatClient("tiny-qwen3-chat");

    /// <summary>
    /// The official SDK both ways: Microsoft.Extensions.AI's chat client over the SDK's <see cref="ResponsesClient"/>
    /// for the whole response, and the SDK's own streaming call (Microsoft.Extensions.AI.OpenAI 10.11 streams through
    /// OpenAI 2.14's signature, which 2.15 changed: with 2.15, the version these tests pin, its streaming cannot load).
    /// </summary>
    [Fact]
    public async Task The_OpenAI_SDKs_responses_client_gets_the_same_text_and_usage_streamed_and_not()
    {
        using var client = SdkClient();
        List<Microsoft.Extensions.AI.ChatMessage> messages = [new(ChatRole.System, "Be brief."), new(ChatRole.User, "Name a colour.")];
        var options = new ChatOptions { Temperature = 0, MaxOutputTokens = 10, Reasoning = new ReasoningOptions { Effort = ReasoningEffort.None } };
        var whole = await client.GetResponseAsync(messages, options);
        Assert.Equal("tiny-qwen3-chat", whole.ModelId);
        Assert.Null(whole.ConversationId); // nothing stored: the client keeps the conversation
        Assert.True(whole.Usage!.OutputTokenCount is > 0 and <= 10);
        Assert.NotEmpty(whole.Text);

        var sdk = new ResponsesClient(new ApiKeyCredential(ServerFixture.ApiKey), new ResponsesClientOptions { Endpoint = new Uri(fixture.Server.BaseAddress, "v1") });
        var request = new CreateResponseOptions("tiny-qwen3-chat", [ResponseItem.CreateSystemMessageItem("Be brief."), ResponseItem.CreateUserMessageItem("Name a colour.")])
        {
            Temperature = 0, MaxOutputTokenCount = 10, StreamingEnabled = true,
            ReasoningOptions = new ResponseReasoningOptions { ReasoningEffortLevel = ResponseReasoningEffortLevel.None },
        };
        var text = new StringBuilder();
        ResponseResult? final = null;
        int sequence = -1;
        await foreach (var update in await sdk.CreateResponseStreamingAsync(request))
        {
            Assert.Equal(sequence + 1, update.SequenceNumber);
            sequence = update.SequenceNumber;
            switch (update)
            {
                case StreamingResponseOutputTextDeltaUpdate delta: text.Append(delta.Delta); break;
                case StreamingResponseCompletedUpdate completed: final = completed.Response; break;
                case StreamingResponseIncompleteUpdate incomplete: final = incomplete.Response; break;
            }
        }
        Assert.Equal(whole.Text, text.ToString());
        Assert.NotNull(final);
        Assert.Equal(whole.Usage.InputTokenCount, final!.Usage.InputTokenCount);
        Assert.Equal(whole.Usage.OutputTokenCount, final.Usage.OutputTokenCount);
        Assert.Equal(whole.Text, Assert.IsAssignableFrom<MessageResponseItem>(Assert.Single(final.OutputItems)).Content[0].Text);

        // The same conversation as a chat completion gives the same greedy text.
        var chat = new JsonObject
        {
            ["model"] = "tiny-qwen3-chat", ["temperature"] = 0, ["max_tokens"] = 10, ["reasoning_effort"] = "none",
            ["messages"] = new JsonArray(new JsonObject { ["role"] = "system", ["content"] = "Be brief." }, new JsonObject { ["role"] = "user", ["content"] = "Name a colour." }),
        };
        var (_, completion) = await Post("v1/chat/completions", chat);
        Assert.Equal(completion["choices"]![0]!["message"]!["content"]!.GetValue<string>(), whole.Text);
    }

    [Fact]
    public async Task A_json_schema_text_format_gives_output_the_schema_accepts()
    {
        const string schema = """{"type": "object", "properties": {"sky": {"enum": ["clear", "rain"]}, "temp": {"type": "integer", "minimum": -30, "maximum": 45}}, "required": ["sky", "temp"], "additionalProperties": false}""";
        var request = new JsonObject
        {
            ["model"] = "tiny-qwen3-chat", ["input"] = "Forecast?", ["temperature"] = 1, ["seed"] = 4, ["max_output_tokens"] = 200,
            ["chat_template_kwargs"] = new JsonObject { ["enable_thinking"] = false },
            ["text"] = new JsonObject { ["format"] = new JsonObject { ["type"] = "json_schema", ["name"] = "forecast", ["schema"] = JsonNode.Parse(schema) } },
        };
        var (status, body) = await Post("v1/responses", request);
        Assert.True(status == HttpStatusCode.OK, body.ToJsonString());
        Assert.Equal("completed", body["status"]!.GetValue<string>());
        var text = OutputText(body);
        Assert.True(Json.Schema.JsonSchema.FromText(schema).Evaluate(System.Text.Json.JsonDocument.Parse(text).RootElement).IsValid, text);
        Assert.Equal("json_schema", body["text"]!["format"]!["type"]!.GetValue<string>());
    }

    [Theory]
    [InlineData("""{"input": "hi", "previous_response_id": "resp_1"}""", "previous_response_id")]
    [InlineData("""{"input": "hi", "background": true}""", "background")]
    [InlineData("""{"input": "hi", "tools": [{"type": "web_search"}]}""", "tools")]
    [InlineData("""{"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}""", "input")]
    [InlineData("""{"input": [{"type": "item_reference", "id": "msg_1"}]}""", "input")]
    [InlineData("""{"input": []}""", "input")]
    [InlineData("""{"input": "hi", "include": ["reasoning.encrypted_content"]}""", "include")]
    [InlineData("""{"input": "hi", "max_output_tokens": 1000000}""", "max_output_tokens")]
    [InlineData("""{"input": "hi", "truncation": "auto"}""", "truncation")]
    [InlineData("""{"input": "hi", "frobnicate": 1}""", "frobnicate")]
    [InlineData("""{"input": [{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "[1]"}]}""", "input")]
    public async Task Requests_the_server_cannot_serve_get_a_400_naming_the_field(string json, string param)
    {
        var (status, body) = await Post("v1/responses", (JsonObject)JsonNode.Parse(json)!);
        Assert.Equal(HttpStatusCode.BadRequest, status);
        Assert.Equal(param, body["error"]!["param"]!.GetValue<string>());
        Assert.Contains(param, body["error"]!["message"]!.GetValue<string>());
    }

    [Fact]
    public async Task Fetching_a_response_by_id_is_a_404_that_says_nothing_is_stored_and_a_missing_key_a_401()
    {
        var get = await fixture.Http.GetAsync("v1/responses/resp_123");
        Assert.Equal(HttpStatusCode.NotFound, get.StatusCode);
        Assert.Contains("does not store", (await get.Content.ReadAsStringAsync()));
        using var anonymous = new HttpClient { BaseAddress = fixture.Server.BaseAddress };
        var post = await anonymous.PostAsync("v1/responses", new StringContent("""{"input": "hi"}""", Encoding.UTF8, "application/json"));
        Assert.Equal(HttpStatusCode.Unauthorized, post.StatusCode);
    }

    [Fact]
    public async Task A_client_that_disconnects_mid_stream_frees_its_blocks()
    {
        var request = GreedyResponse(2000);
        request["stream"] = true;
        using (var message = new HttpRequestMessage(HttpMethod.Post, "v1/responses") { Content = new StringContent(request.ToJsonString(), Encoding.UTF8, "application/json") })
        using (var response = await fixture.Http.SendAsync(message, HttpCompletionOption.ResponseHeadersRead))
        {
            using var reader = new StreamReader(await response.Content.ReadAsStreamAsync());
            int deltas = 0;
            while (deltas < 3 && await reader.ReadLineAsync() is { } line)
                if (line == "event: response.output_text.delta") deltas++;
            Assert.Equal(3, deltas);
        } // the connection goes: the server aborts the request

        var engine = fixture.Server.Engine.Engine;
        await engine.WhenIdleAsync().WaitAsync(ServerTests.HangGuard);
        await engine.InvokeAsync(e => e.Blocks.CheckInvariants(expectAllFree: true));
    }
}

/// <summary>The Responses API over the scripted engine seam, where the model calls tools and thinks when the test says so.</summary>
public sealed class ScriptedResponsesApiTests
{
    private static async Task<(LocalVllmServer Server, IChatClient Client)> Start(ScriptedEngine engine)
    {
        var server = LocalVllmServer.CreateOverChatEngine(new ServerOptions { Model = "scripted", Port = 0 }, engine);
        await server.StartAsync();
        var client = new ResponsesClient(new ApiKeyCredential("unused"), new ResponsesClientOptions { Endpoint = new Uri(server.BaseAddress, "v1") })
            .AsIChatClient(engine.ModelId);
        return (server, client);
    }

    private const string Thought = "<think>\nThe user wants the weather.\n</think>\n\n";
    private const string Call = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";

    [Fact]
    public async Task A_function_invocation_round_trip_through_the_SDKs_client_renders_the_call_and_its_result_into_the_next_prompt()
    {
        var engine = new ScriptedEngine([Thought, Call], ["It is ", "sunny", "."]);
        var (server, responses) = await Start(engine);
        await using var _ = server;
        int invoked = 0;
        var tool = AIFunctionFactory.Create((string city) => { invoked++; return $"sunny in {city}"; }, "get_weather");
        using var client = new ChatClientBuilder(responses).UseFunctionInvocation().Build();
        var response = await client.GetResponseAsync([new(ChatRole.User, "Weather in Paris?")], new ChatOptions { Tools = [tool] });

        Assert.Equal(1, invoked);
        Assert.Equal("It is sunny.", response.Text);
        Assert.Equal(2, engine.Prompts.Count);
        // The second prompt is the first plus the assistant's turn (its tool call) and the tool's result, rendered by
        // the chat template as an in-process conversation would be.
        Assert.StartsWith(engine.Prompts[0][..engine.Prompts[0].LastIndexOf("<|im_start|>assistant", StringComparison.Ordinal)], engine.Prompts[1]);
        Assert.Contains(Call, engine.Prompts[1]);
        // Microsoft.Extensions.AI.OpenAI sends a function's result JSON-serialized (a string arrives quoted).
        Assert.Contains("<tool_response>\n\"sunny in Paris\"\n</tool_response>", engine.Prompts[1]);
        Assert.Contains("\"name\": \"get_weather\"", engine.Prompts[0]); // the tool's declaration reached the template
        Assert.Contains(response.Messages.SelectMany(m => m.Contents), c => c is TextReasoningContent);
        Assert.Equal(2 + 3, response.Usage!.OutputTokenCount); // summed over both calls: each scripted chunk is one token
    }

    /// <summary>
    /// A streamed tool call, as a client loop does it over HTTP: the items of <c>response.output_item.done</c> go back
    /// as input with the function's output, and the next prompt renders the reasoning, the call and the result.
    /// </summary>
    [Fact]
    public async Task Streamed_output_items_sent_back_as_input_continue_the_conversation()
    {
        var engine = new ScriptedEngine([Thought, Call], ["It is ", "sunny", "."]);
        var server = LocalVllmServer.CreateOverChatEngine(new ServerOptions { Model = "scripted", Port = 0 }, engine);
        await server.StartAsync();
        await using var _ = server;
        using var http = new HttpClient { BaseAddress = server.BaseAddress };
        var tools = new JsonArray(new JsonObject
        {
            ["type"] = "function", ["name"] = "get_weather",
            ["parameters"] = JsonNode.Parse("""{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}"""),
        });
        async Task<List<(string Event, JsonObject Data)>> Stream(JsonArray input)
        {
            var request = new JsonObject { ["input"] = input.DeepClone(), ["tools"] = tools.DeepClone(), ["stream"] = true };
            var response = await http.PostAsync("v1/responses", new StringContent(request.ToJsonString(), Encoding.UTF8, "application/json"));
            Assert.Equal(HttpStatusCode.OK, response.StatusCode);
            var events = new List<(string, JsonObject)>();
            foreach (var line in (await response.Content.ReadAsStringAsync()).Split('\n'))
                if (line.StartsWith("data: ", StringComparison.Ordinal))
                {
                    var data = (JsonObject)JsonNode.Parse(line[6..])!;
                    events.Add((data["type"]!.GetValue<string>(), data));
                }
            return events;
        }

        var input = new JsonArray(new JsonObject { ["role"] = "user", ["content"] = "Weather in Paris?" });
        var first = await Stream(input);
        Assert.Contains(first, e => e.Event == "response.reasoning_text.delta");
        Assert.Equal("""{"city":"Paris"}""", first.Single(e => e.Event == "response.function_call_arguments.done").Data["arguments"]!.GetValue<string>());
        var items = first.Where(e => e.Event == "response.output_item.done").Select(e => e.Data["item"]!).ToList();
        Assert.Equal(["reasoning", "function_call"], items.Select(i => i["type"]!.GetValue<string>()));
        Assert.Equal("completed", first[^1].Data["response"]!["status"]!.GetValue<string>());
        foreach (var item in items) input.Add(item.DeepClone());
        input.Add(new JsonObject { ["type"] = "function_call_output", ["call_id"] = items[1]["call_id"]!.DeepClone(), ["output"] = "sunny in Paris" });

        var second = await Stream(input);
        Assert.Equal("It is sunny.", string.Concat(second.Where(e => e.Event == "response.output_text.delta").Select(e => e.Data["delta"]!.GetValue<string>())));
        // The assistant's turn (its reasoning kept, as the template keeps it after the last user message, and its
        // call) and the tool's result are in the next prompt, after the first prompt's conversation.
        Assert.StartsWith(engine.Prompts[0][..engine.Prompts[0].LastIndexOf("<|im_start|>assistant", StringComparison.Ordinal)], engine.Prompts[1]);
        Assert.Contains("<think>\nThe user wants the weather.\n</think>", engine.Prompts[1]);
        Assert.Contains(Call, engine.Prompts[1]);
        Assert.Contains("<tool_response>\nsunny in Paris\n</tool_response>", engine.Prompts[1]);
    }

    [Fact]
    public async Task A_reasoning_item_and_a_function_call_come_back_as_output_items_in_the_models_order()
    {
        var engine = new ScriptedEngine([Thought, Call]);
        var server = LocalVllmServer.CreateOverChatEngine(new ServerOptions { Model = "scripted", Port = 0 }, engine);
        await server.StartAsync();
        await using var _ = server;
        using var http = new HttpClient { BaseAddress = server.BaseAddress };
        var request = new JsonObject
        {
            ["input"] = "Weather in Paris?",
            ["tools"] = new JsonArray(new JsonObject
            {
                ["type"] = "function", ["name"] = "get_weather", ["description"] = "The weather.",
                ["parameters"] = JsonNode.Parse("""{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}"""),
            }),
        };
        var answer = await http.PostAsync("v1/responses", new StringContent(request.ToJsonString(), Encoding.UTF8, "application/json"));
        var body = (JsonObject)JsonNode.Parse(await answer.Content.ReadAsStringAsync())!;
        Assert.True(answer.IsSuccessStatusCode, body.ToJsonString());
        var output = body["output"]!.AsArray();
        Assert.Equal(["reasoning", "function_call"], output.Select(i => i!["type"]!.GetValue<string>()));
        Assert.Equal("The user wants the weather.", output[0]!["content"]![0]!["text"]!.GetValue<string>().Trim());
        Assert.Equal("reasoning_text", output[0]!["content"]![0]!["type"]!.GetValue<string>());
        Assert.Equal("get_weather", output[1]!["name"]!.GetValue<string>());
        Assert.Equal("""{"city":"Paris"}""", output[1]!["arguments"]!.GetValue<string>());
        Assert.Equal("completed", body["status"]!.GetValue<string>());
        Assert.Equal("get_weather", body["tools"]![0]!["name"]!.GetValue<string>()); // the request's tools, repeated as sent
        Assert.Contains("\"description\": \"The weather.\"", engine.Prompts[0]);
    }
    /// <summary>
    /// The engine fails a request after its first tokens went out: the stream ends with an error the client can read
    /// (chat: an error event and [DONE], as vLLM's; responses: response.failed), not with a cut connection.
    /// </summary>
    [Fact]
    public async Task A_stream_that_fails_part_way_ends_with_an_error_event_on_chat_and_responses()
    {
        var failure = new LocalVllm.Engine.RequestFailedException("Request 'r' failed while processing its output: boom", new InvalidOperationException("boom"));
        var engine = new ScriptedEngine(["It is ", "sun"], ["It is ", "sun"]) { FailWith = failure };
        var server = LocalVllmServer.CreateOverChatEngine(new ServerOptions { Model = "scripted", Port = 0 }, engine);
        await server.StartAsync();
        await using var _ = server;
        using var http = new HttpClient { BaseAddress = server.BaseAddress };

        var chat = new JsonObject { ["messages"] = new JsonArray(new JsonObject { ["role"] = "user", ["content"] = "Weather?" }), ["stream"] = true };
        var chatResponse = await http.PostAsync("v1/chat/completions", new StringContent(chat.ToJsonString(), Encoding.UTF8, "application/json"));
        var chatEvents = (await chatResponse.Content.ReadAsStringAsync()).Split("\n\n", StringSplitOptions.RemoveEmptyEntries);
        Assert.Equal("data: [DONE]", chatEvents[^1]);
        var error = JsonNode.Parse(chatEvents[^2]["data: ".Length..])!["error"]!;
        Assert.Contains("boom", error["message"]!.GetValue<string>());
        Assert.Equal(500, error["code"]!.GetValue<int>());
        Assert.Equal("It is sun", string.Concat(chatEvents.SkipLast(2).Select(e => JsonNode.Parse(e["data: ".Length..])!["choices"]![0]!["delta"]!["content"]?.GetValue<string>())));

        var request = new JsonObject { ["input"] = "Weather?", ["stream"] = true };
        var response = await http.PostAsync("v1/responses", new StringContent(request.ToJsonString(), Encoding.UTF8, "application/json"));
        var events = (await response.Content.ReadAsStringAsync()).Split('\n').Where(l => l.StartsWith("data: ", StringComparison.Ordinal))
            .Select(l => JsonNode.Parse(l[6..])!).ToList();
        Assert.Equal("response.failed", events[^1]["type"]!.GetValue<string>());
        var failed = events[^1]["response"]!;
        Assert.Equal("failed", failed["status"]!.GetValue<string>());
        Assert.Equal("server_error", failed["error"]!["code"]!.GetValue<string>());
        Assert.Contains("boom", failed["error"]!["message"]!.GetValue<string>());
        // The text that went out before the failure is in the failed response's message item, closed.
        Assert.Equal("It is sun", failed["output"]![0]!["content"]![0]!["text"]!.GetValue<string>());
        Assert.Equal("response.output_item.done", events[^2]["type"]!.GetValue<string>());
    }
    /// <summary>
    /// With the response store on, Microsoft.Extensions.AI's client (which then continues by id) sends only what is new,
    /// and the server rebuilds the conversation: the second prompt holds the question, the call and the result.
    /// </summary>
    [Fact]
    public async Task With_the_store_on_a_tool_round_trip_continues_by_id_and_the_server_keeps_the_conversation()
    {
        var engine = new ScriptedEngine([Thought, Call], ["It is ", "sunny", "."]);
        var server = LocalVllmServer.CreateOverChatEngine(new ServerOptions { Model = "scripted", Port = 0, ResponsesStoreSize = 10 }, engine);
        await server.StartAsync();
        await using var _ = server;
        var sent = new List<string>();
        using var recorder = new RecordingHandler(sent);
        var responses = new ResponsesClient(new ApiKeyCredential("unused"), new ResponsesClientOptions
        {
            Endpoint = new Uri(server.BaseAddress, "v1"), Transport = new System.ClientModel.Primitives.HttpClientPipelineTransport(new HttpClient(recorder)),
        }).AsIChatClient(engine.ModelId);
        int invoked = 0;
        var tool = AIFunctionFactory.Create((string city) => { invoked++; return $"sunny in {city}"; }, "get_weather");
        using var client = new ChatClientBuilder(responses).UseFunctionInvocation().Build();
        var response = await client.GetResponseAsync([new(ChatRole.User, "Weather in Paris?")], new ChatOptions { Tools = [tool] });

        Assert.Equal((1, "It is sunny."), (invoked, response.Text));
        Assert.NotNull(response.ConversationId); // stored: the client may continue by id
        Assert.Equal(2, sent.Count);
        var second = JsonNode.Parse(sent[1])!;
        Assert.StartsWith("resp_", second["previous_response_id"]!.GetValue<string>());
        Assert.DoesNotContain("Weather in Paris?", sent[1]); // only the tool's result went over the wire
        // ...and the server rebuilt the rest: the question, the assistant's call and the result, in the template.
        Assert.StartsWith(engine.Prompts[0][..engine.Prompts[0].LastIndexOf("<|im_start|>assistant", StringComparison.Ordinal)], engine.Prompts[1]);
        Assert.Contains(Call, engine.Prompts[1]);
        Assert.Contains("<tool_response>", engine.Prompts[1]);
    }

    private sealed class RecordingHandler(List<string> bodies) : DelegatingHandler(new HttpClientHandler())
    {
        protected override async Task<HttpResponseMessage> SendAsync(HttpRequestMessage request, CancellationToken cancellationToken)
        {
            if (request.Method == HttpMethod.Post && request.Content is not null) bodies.Add(await request.Content.ReadAsStringAsync(cancellationToken));
            return await base.SendAsync(request, cancellationToken);
        }
    }

    /// <summary>
    /// The store by hand: stored responses are fetched and deleted by id, a continuation gets its own instructions and
    /// not the earlier ones (as OpenAI's), "store": false keeps nothing, the oldest go past the store's size, and an id
    /// not in the store is a 404 naming the field.
    /// </summary>
    [Fact]
    public async Task Stored_responses_are_fetched_continued_deleted_and_dropped_oldest_first()
    {
        var engine = new ScriptedEngine(["One."], ["Two."], ["Three."], ["Four."], ["Five."]);
        var server = LocalVllmServer.CreateOverChatEngine(new ServerOptions { Model = "scripted", Port = 0, ResponsesStoreSize = 2 }, engine);
        await server.StartAsync();
        await using var _ = server;
        using var http = new HttpClient { BaseAddress = server.BaseAddress };
        async Task<(HttpStatusCode, JsonObject)> Send(HttpMethod method, string path, JsonObject? body = null)
        {
            using var request = new HttpRequestMessage(method, path) { Content = body is null ? null : new StringContent(body.ToJsonString(), Encoding.UTF8, "application/json") };
            using var response = await http.SendAsync(request);
            return (response.StatusCode, (JsonObject)JsonNode.Parse(await response.Content.ReadAsStringAsync())!);
        }

        var (_, first) = await Send(HttpMethod.Post, "v1/responses", new JsonObject { ["instructions"] = "Be brief.", ["input"] = "Count." });
        string id1 = first["id"]!.GetValue<string>();
        Assert.True(first["store"]!.GetValue<bool>());
        var (status, fetched) = await Send(HttpMethod.Get, $"v1/responses/{id1}");
        Assert.Equal(HttpStatusCode.OK, status);
        Assert.Equal(first.ToJsonString(), fetched.ToJsonString());

        var (_, second) = await Send(HttpMethod.Post, "v1/responses", new JsonObject { ["instructions"] = "Be loud.", ["input"] = "Again.", ["previous_response_id"] = id1 });
        Assert.Equal(id1, second["previous_response_id"]!.GetValue<string>());
        Assert.Contains("Count.", engine.Prompts[1]);
        Assert.Contains("One.", engine.Prompts[1]);
        Assert.Contains("Be loud.", engine.Prompts[1]);
        Assert.DoesNotContain("Be brief.", engine.Prompts[1]);

        var (_, unstored) = await Send(HttpMethod.Post, "v1/responses", new JsonObject { ["input"] = "Quiet.", ["store"] = false });
        Assert.False(unstored["store"]!.GetValue<bool>());
        Assert.Equal(HttpStatusCode.NotFound, (await Send(HttpMethod.Get, $"v1/responses/{unstored["id"]}")).Item1);

        // Deleting, then the size: two kept, the oldest dropped first.
        var (deletedStatus, deleted) = await Send(HttpMethod.Delete, $"v1/responses/{id1}");
        Assert.Equal((HttpStatusCode.OK, true), (deletedStatus, deleted["deleted"]!.GetValue<bool>()));
        Assert.Equal(HttpStatusCode.NotFound, (await Send(HttpMethod.Get, $"v1/responses/{id1}")).Item1);
        var (_, fourth) = await Send(HttpMethod.Post, "v1/responses", new JsonObject { ["input"] = "4" });
        var (_, fifth) = await Send(HttpMethod.Post, "v1/responses", new JsonObject { ["input"] = "5" });
        Assert.Equal(HttpStatusCode.NotFound, (await Send(HttpMethod.Get, $"v1/responses/{second["id"]}")).Item1);
        Assert.Equal(HttpStatusCode.OK, (await Send(HttpMethod.Get, $"v1/responses/{fourth["id"]}")).Item1);
        Assert.Equal(HttpStatusCode.OK, (await Send(HttpMethod.Get, $"v1/responses/{fifth["id"]}")).Item1);

        var (missingStatus, missing) = await Send(HttpMethod.Post, "v1/responses", new JsonObject { ["input"] = "x", ["previous_response_id"] = "resp_nope" });
        Assert.Equal(HttpStatusCode.NotFound, missingStatus);
        Assert.Equal("previous_response_id", missing["error"]!["param"]!.GetValue<string>());
    }
}
