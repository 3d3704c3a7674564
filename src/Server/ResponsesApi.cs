using System.Buffers;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using LocalVllm.Engine;
using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.AI;

namespace LocalVllm.Server;

/// <summary>
/// OpenAI's Responses API (<c>POST /v1/responses</c>), as vLLM serves it: the request's <c>instructions</c> and
/// <c>input</c> items become the same chat messages a chat completion would carry, run through the same chat client,
/// and the reply comes back as output items (reasoning, a message, function calls), whole or as the API's typed stream
/// events. By default nothing is kept after the response: <c>previous_response_id</c> is refused and every response
/// says <c>"store": false</c>, so clients (Microsoft.Extensions.AI's among them) send the whole conversation. With the
/// response store on (<see cref="ServerOptions.ResponsesStoreSize"/>, vLLM's <c>VLLM_ENABLE_RESPONSES_API_STORE</c>),
/// stored responses keep their conversation in memory, so a request may continue one by id (the prefix cache still
/// holds its tokens), and GET and DELETE by id answer.
/// </summary>
internal sealed partial class OpenAiEndpoints
{
    private readonly ResponsesStore? _responses = options.ResponsesStoreSize > 0 ? new ResponsesStore(options.ResponsesStoreSize) : null;

    private async Task Responses(HttpContext ctx)
    {
        var body = await ReadBody(ctx);
        var lora = CheckModel(body);
        var request = OpenAiResponsesRequest.Parse(body, storeEnabled: _responses is not null);
        if (lora is not null) request.Options.ModelId = lora.Name; // the chat client runs the request under the adapter
        // The conversation so far: a stored response's (its instructions are not carried over, as OpenAI's are not),
        // then this request's input; this request's instructions go first.
        var conversation = new List<ChatMessage>();
        if (request.PreviousResponseId is { } previous)
            conversation.AddRange(_responses!.Find(previous)?.Conversation ?? throw new ApiException(404,
                $"Response '{previous}' is not in the store (never stored, deleted, or among the oldest dropped at {options.ResponsesStoreSize} kept).", "NotFoundError", "previous_response_id"));
        conversation.AddRange(request.Input);
        List<ChatMessage> messages = request.Instructions is { } system ? [system, .. conversation] : conversation;
        bool store = _responses is not null && request.Store;
        if (request.Options.MaxOutputTokens is int max && max >= chat.MaxModelLen)
            throw new ApiException(400, $"max_output_tokens = {max} does not fit in this model's context of {chat.MaxModelLen} tokens (prompt included).", param: "max_output_tokens");
        if (request.Logprobs && engine is null) throw new ApiException(400, "logprobs are not available from this server's engine.", param: "include");
        var response = new ResponseAssembler($"resp_{Guid.NewGuid():N}", DateTimeOffset.UtcNow.ToUnixTimeSeconds(), lora?.Name ?? ModelName, request.Echo)
        {
            Stored = store, PreviousResponseId = request.PreviousResponseId,
        };
        var turn = new ChatTurn(engine, request.Logprobs, 0);
        // The first update comes before any byte is sent, so an overloaded engine or a bad request still gets its status.
        await using var updates = _chat.GetStreamingResponseAsync(messages, request.Options, ctx.RequestAborted).GetAsyncEnumerator(ctx.RequestAborted);
        bool any = await updates.MoveNextAsync();
        void Keep(JsonObject finished)
        {
            if (!store) return;
            var kept = new List<ChatMessage>(conversation);
            var output = finished["output"]!.AsArray();
            for (int i = 0; i < output.Count; i++) OpenAiResponsesRequest.AddItem(kept, output[i], i);
            _responses!.Add(finished["id"]!.GetValue<string>(), finished, kept);
        }
        if (!request.Stream)
        {
            for (; any; any = await updates.MoveNextAsync())
                foreach (var delta in turn.Add(updates.Current)) response.Add(delta);
            var whole = response.Finish(turn);
            Keep(whole);
            await Json(ctx, whole);
            return;
        }

        StartEventStream(ctx);
        var writer = ctx.Response.BodyWriter;
        response.Emit = (type, data) =>
        {
            writer.Write(Encoding.UTF8.GetBytes($"event: {type}\ndata: "));
            using (var json = new Utf8JsonWriter(writer, new JsonWriterOptions { Encoder = Compact.Encoder }))
                data.WriteTo(json);
            writer.Write("\n\n"u8);
        };
        response.Start();
        await Flush(ctx);
        try
        {
            for (; any; any = await updates.MoveNextAsync())
            {
                foreach (var delta in turn.Add(updates.Current)) response.Add(delta);
                await Flush(ctx);
            }
            Keep(response.Finish(turn));
        }
        catch (Exception e) when (!ctx.RequestAborted.IsCancellationRequested)
        {
            // Failed after the stream began (the engine failed the request, or its deadline passed): the stream ends
            // with response.failed carrying the error, as OpenAI's does, instead of a connection cut mid-response.
            var error = e is OperationCanceledException ? new ApiException(500, "The request was cancelled by the server.", "internal_server_error") : Classify(e);
            response.Fail(error.Status >= 500 ? "server_error" : error.Type, error.Message);
        }
        await Flush(ctx);
    }

    /// <summary>GET (the stored response) and DELETE by id, when the store is on.</summary>
    private Task StoredResponse(HttpContext ctx)
    {
        if (_responses is null)
            throw new ApiException(404,
                "This server does not store responses (as vLLM without its response store; start it with --enable-responses-store): send the whole conversation as 'input' instead of fetching or chaining by id.",
                "NotFoundError", "response_id");
        string id = ctx.Request.RouteValues["id"]?.ToString() ?? "";
        if (ctx.Request.RouteValues.ContainsKey("action"))
            throw new ApiException(404, $"'{ctx.Request.Path}' is not served: a stored response can be fetched (GET /v1/responses/{{id}}) and deleted (DELETE).", "NotFoundError");
        if (HttpMethods.IsDelete(ctx.Request.Method))
            return _responses.Remove(id)
                ? Json(ctx, new JsonObject { ["id"] = id, ["object"] = "response", ["deleted"] = true })
                : throw new ApiException(404, $"Response '{id}' is not in the store.", "NotFoundError", "response_id");
        return _responses.Find(id) is { } found
            ? Json(ctx, found.Response)
            : throw new ApiException(404, $"Response '{id}' is not in the store (never stored, deleted, or among the oldest dropped at {options.ResponsesStoreSize} kept).", "NotFoundError", "response_id");
    }
}

/// <summary>
/// Stored responses of <c>/v1/responses</c>, in memory, the oldest dropped past a capacity: each with the conversation
/// it ended (input and output as chat messages) so that a request may continue it. Safe across requests.
/// </summary>
internal sealed class ResponsesStore(int capacity)
{
    public sealed record Entry(JsonObject Response, IReadOnlyList<ChatMessage> Conversation);

    private readonly Dictionary<string, LinkedListNode<(string Id, Entry Entry)>> _byId = [];
    private readonly LinkedList<(string Id, Entry Entry)> _order = new(); // oldest first

    public void Add(string id, JsonObject response, IReadOnlyList<ChatMessage> conversation)
    {
        lock (_byId)
        {
            _byId[id] = _order.AddLast((id, new Entry((JsonObject)response.DeepClone(), conversation)));
            while (_byId.Count > capacity)
            {
                _byId.Remove(_order.First!.Value.Id);
                _order.RemoveFirst();
            }
        }
    }

    public Entry? Find(string id)
    {
        lock (_byId) return _byId.TryGetValue(id, out var node) ? node.Value.Entry : null;
    }

    public bool Remove(string id)
    {
        lock (_byId)
        {
            if (!_byId.Remove(id, out var node)) return false;
            _order.Remove(node);
            return true;
        }
    }
}

/// <summary>A <c>/v1/responses</c> body read into chat messages and options (the chat completion's, so both behave alike).</summary>
internal sealed class OpenAiResponsesRequest
{
    /// <summary>The request's <c>instructions</c> as a system message (not kept with a stored conversation), or null.</summary>
    public ChatMessage? Instructions { get; init; }
    /// <summary>The request's <c>input</c> items as chat messages.</summary>
    public required List<ChatMessage> Input { get; init; }
    /// <summary>The stored response this one continues (only with the store on).</summary>
    public string? PreviousResponseId { get; init; }
    /// <summary>OpenAI's <c>store</c> (true unless the request says false).</summary>
    public bool Store { get; init; } = true;
    public required ChatOptions Options { get; init; }
    public required bool Stream { get; init; }
    /// <summary><c>include: ["message.output_text.logprobs"]</c>: output text carries its tokens' log-probabilities.</summary>
    public required bool Logprobs { get; init; }
    /// <summary>The request's settings that a response object repeats (instructions, sampling, tools, text format, ...).</summary>
    public required JsonObject Echo { get; init; }

    private static readonly string[] Known =
    [
        "model", "input", "instructions", "stream", "stream_options", "temperature", "top_p", "max_output_tokens", "tools", "tool_choice",
        "parallel_tool_calls", "text", "reasoning", "include", "top_logprobs", "previous_response_id", "conversation", "background",
        "max_tool_calls", "prompt", "truncation",
        // vLLM's extra sampling fields, as on chat completions.
        "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "stop", "min_tokens", "ignore_eos", "priority",
        "chat_template_kwargs", "cache_salt",
        // OpenAI's bookkeeping fields, which clients may send: nothing here depends on them.
        "store", "metadata", "user", "service_tier", "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
    ];

    public static OpenAiResponsesRequest Parse(JsonObject body, bool storeEnabled = false)
    {
        foreach (var (key, _) in body)
            if (!Known.Contains(key)) throw new ApiException(400, $"Unknown or unsupported field '{key}'.", param: key);
        foreach (var stateful in storeEnabled ? new[] { "conversation", "prompt" } : ["previous_response_id", "conversation", "prompt"])
            if (body[stateful] is { } v && v.GetValueKind() != JsonValueKind.Null)
                throw new ApiException(400, storeEnabled
                    ? $"'{stateful}' needs conversations or prompts kept on the server, which this server does not keep: continue a stored response with 'previous_response_id', or send the whole conversation as 'input'."
                    : $"'{stateful}' needs responses or prompts stored on the server, and this server stores none (as vLLM without its store; start it with --enable-responses-store): send the whole conversation as 'input'.", param: stateful);
        string? previous = body["previous_response_id"] is JsonValue p && p.GetValueKind() == JsonValueKind.String ? p.GetValue<string>() : null;
        if (OpenAiChatRequest.Bool(body, "background") == true)
            throw new ApiException(400, "'background' responses need a response store, which this server does not keep.", param: "background");
        if (body["max_tool_calls"] is { } maxToolCalls && maxToolCalls.GetValueKind() != JsonValueKind.Null)
            throw new ApiException(400, "'max_tool_calls' is not supported: the model's tool calls are returned for the client to run.", param: "max_tool_calls");
        if (body["truncation"] is JsonValue truncation && truncation.GetValueKind() == JsonValueKind.String && truncation.GetValue<string>() != "disabled")
            throw new ApiException(400, "'truncation' must be \"disabled\": a conversation longer than the context is refused with the lengths, not cut.", param: "truncation");

        // Sampling and the vLLM extras go the chat completion's way: the same names, read by the same code.
        var chatBody = new JsonObject();
        foreach (var key in new[] { "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "stop",
                     "min_tokens", "ignore_eos", "priority", "chat_template_kwargs", "parallel_tool_calls", "cache_salt" })
            if (body[key] is { } value) chatBody[key] = value.DeepClone();
        if (body["max_output_tokens"] is { } maxTokens) chatBody["max_tokens"] = maxTokens.DeepClone();
        if (body["reasoning"] is JsonObject reasoning && reasoning["effort"] is { } effort && effort.GetValueKind() != JsonValueKind.Null)
            chatBody["reasoning_effort"] = effort.DeepClone();
        bool logprobs = false;
        if (body["include"] is JsonArray include)
            foreach (var item in include)
            {
                var name = item is JsonValue s && s.GetValueKind() == JsonValueKind.String ? s.GetValue<string>() : throw new ApiException(400, "'include' must be an array of strings.", param: "include");
                if (name == "message.output_text.logprobs") logprobs = true;
                else throw new ApiException(400, $"include '{name}' is not available from this server; \"message.output_text.logprobs\" is.", param: "include");
            }
        if (logprobs)
        {
            chatBody["logprobs"] = true;
            if (body["top_logprobs"] is { } top) chatBody["top_logprobs"] = top.DeepClone();
        }
        if (body["tools"] is JsonArray tools) chatBody["tools"] = new JsonArray(tools.Select((t, i) => (JsonNode?)ChatTool(t, i)).ToArray());
        if (body["tool_choice"] is { } toolChoice) chatBody["tool_choice"] = ChatToolChoice(toolChoice);
        if (body["text"] is JsonObject text && text["format"] is JsonObject format) chatBody["response_format"] = ChatResponseFormat(format);

        ChatMessage? system = null;
        if (body["instructions"] is { } instructions && instructions.GetValueKind() != JsonValueKind.Null)
            system = new ChatMessage(ChatRole.System, instructions is JsonValue iv && iv.GetValueKind() == JsonValueKind.String
                ? iv.GetValue<string>() : throw new ApiException(400, "'instructions' must be a string.", param: "instructions"));
        var messages = new List<ChatMessage>();
        switch (body["input"])
        {
            case JsonValue v when v.GetValueKind() == JsonValueKind.String:
                messages.Add(new ChatMessage(ChatRole.User, v.GetValue<string>()));
                break;
            case JsonArray { Count: > 0 } items:
                for (int i = 0; i < items.Count; i++) AddItem(messages, items[i], i);
                break;
            default:
                throw new ApiException(400, "'input' is required: a string, or a non-empty array of input items.", param: "input");
        }
        chatBody["messages"] = new JsonArray(new JsonObject { ["role"] = "user", ["content"] = "" }); // parsed for its options only
        var options = OpenAiChatRequest.Parse(chatBody).Options(0);

        var echo = new JsonObject
        {
            ["instructions"] = body["instructions"]?.DeepClone(),
            ["max_output_tokens"] = body["max_output_tokens"]?.DeepClone(),
            ["temperature"] = body["temperature"]?.DeepClone(),
            ["top_p"] = body["top_p"]?.DeepClone(),
            ["tools"] = body["tools"]?.DeepClone() ?? new JsonArray(),
            ["tool_choice"] = body["tool_choice"]?.DeepClone() ?? "auto",
            ["parallel_tool_calls"] = body["parallel_tool_calls"]?.DeepClone() ?? true,
            ["text"] = body["text"]?.DeepClone() ?? new JsonObject { ["format"] = new JsonObject { ["type"] = "text" } },
            ["reasoning"] = body["reasoning"]?.DeepClone(),
            ["top_logprobs"] = body["top_logprobs"]?.DeepClone(),
            ["metadata"] = body["metadata"]?.DeepClone() ?? new JsonObject(),
            ["user"] = body["user"]?.DeepClone(),
        };
        return new OpenAiResponsesRequest
        {
            Instructions = system, Input = messages, PreviousResponseId = previous, Store = OpenAiChatRequest.Bool(body, "store") ?? true,
            Options = options, Stream = OpenAiChatRequest.Bool(body, "stream") ?? false, Logprobs = logprobs, Echo = echo,
        };
    }

    /// <summary>
    /// One input item onto the chat: messages by role; an assistant's reasoning, message and function calls that follow
    /// one another are one assistant turn (as the model produced them and the chat template renders them); each
    /// function call's output is a tool message.
    /// </summary>
    internal static void AddItem(List<ChatMessage> messages, JsonNode? node, int index)
    {
        if (node is not JsonObject item) throw new ApiException(400, $"input[{index}] is not an object.", param: "input");
        string type = item["type"] is JsonValue t && t.GetValueKind() == JsonValueKind.String ? t.GetValue<string>() : item["role"] is not null ? "message" : "";
        ChatMessage AssistantTurn()
        {
            if (messages.Count > 0 && messages[^1].Role == ChatRole.Assistant) return messages[^1];
            var turn = new ChatMessage(ChatRole.Assistant, (string?)null);
            messages.Add(turn);
            return turn;
        }
        string Required(string field) => item[field] is JsonValue v && v.GetValueKind() == JsonValueKind.String
            ? v.GetValue<string>() : throw new ApiException(400, $"input[{index}] ({type}) needs '{field}' as a string.", param: "input");
        switch (type)
        {
            case "message":
            {
                var role = item["role"] is JsonValue r && r.GetValueKind() == JsonValueKind.String ? r.GetValue<string>() : "";
                var text = Content(item["content"], index);
                switch (role)
                {
                    case "system" or "developer": messages.Add(new ChatMessage(ChatRole.System, text)); break;
                    case "user": messages.Add(new ChatMessage(ChatRole.User, text)); break;
                    case "assistant": if (text.Length > 0) AssistantTurn().Contents.Add(new TextContent(text)); else AssistantTurn(); break;
                    default: throw new ApiException(400, $"input[{index}] has role '{role}'; use system, developer, user or assistant.", param: "input");
                }
                break;
            }
            case "reasoning":
            {
                // The text of a reasoning item we returned (content) or one a client rebuilt from it (summary).
                var text = string.Concat(new[] { item["content"], item["summary"] }.OfType<JsonArray>().SelectMany(a => a)
                    .Select(p => p?["text"] is JsonValue v && v.GetValueKind() == JsonValueKind.String ? v.GetValue<string>() : ""));
                var turn = AssistantTurn();
                if (text.Length > 0) turn.Contents.Add(new TextReasoningContent(text));
                break;
            }
            case "function_call":
            {
                var arguments = Required("arguments");
                Dictionary<string, object?> parsed;
                try
                {
                    parsed = (JsonNode.Parse(arguments.Length == 0 ? "{}" : arguments) as JsonObject ?? throw new JsonException("not an object"))
                        .ToDictionary(kv => kv.Key, kv => (object?)(kv.Value is null ? null : JsonDocument.Parse(kv.Value.ToJsonString()).RootElement.Clone()));
                }
                catch (JsonException)
                {
                    throw new ApiException(400, $"input[{index}] (function_call) has 'arguments' that are not a JSON object.", param: "input");
                }
                AssistantTurn().Contents.Add(new FunctionCallContent(Required("call_id"), Required("name"), parsed));
                break;
            }
            case "function_call_output":
            {
                var output = item["output"] switch
                {
                    JsonValue v when v.GetValueKind() == JsonValueKind.String => v.GetValue<string>(),
                    JsonArray parts => Content(parts, index),
                    _ => throw new ApiException(400, $"input[{index}] (function_call_output) needs 'output' as a string or text parts.", param: "input"),
                };
                messages.Add(new ChatMessage(ChatRole.Tool, [new FunctionResultContent(Required("call_id"), output)]));
                break;
            }
            case "item_reference":
                throw new ApiException(400, $"input[{index}] is an item_reference, which needs stored items; this server stores none: send the item itself.", param: "input");
            default:
                throw new ApiException(400, $"input[{index}] has type '{type}'; this server takes message, reasoning, function_call and function_call_output items.", param: "input");
        }
    }

    /// <summary>A message's content: a string, or text parts (input_text, output_text); other parts name what is not served.</summary>
    private static string Content(JsonNode? content, int index) => content switch
    {
        null => "",
        JsonValue v when v.GetValueKind() == JsonValueKind.String => v.GetValue<string>(),
        JsonValue v when v.GetValueKind() == JsonValueKind.Null => "",
        JsonArray parts => string.Concat(parts.Select(p => p?["type"]?.GetValue<string>() switch
        {
            "input_text" or "output_text" or "text" => p["text"]?.GetValue<string>() ?? "",
            "refusal" => p["refusal"]?.GetValue<string>() ?? "",
            var other => throw new ApiException(400, $"input[{index}] holds a '{other}' part; this server's models read text only.", param: "input"),
        })),
        _ => throw new ApiException(400, $"input[{index}].content must be a string or an array of content parts.", param: "input"),
    };

    /// <summary>A Responses function tool (flat: name, description, parameters) as a chat completion's tool.</summary>
    private static JsonObject ChatTool(JsonNode? tool, int index)
    {
        if (tool is not JsonObject t || t["type"]?.GetValue<string>() is not { } type)
            throw new ApiException(400, $"tools[{index}] must be an object with a 'type'.", param: "tools");
        if (type != "function")
            throw new ApiException(400, $"tools[{index}] has type '{type}'; this server runs no hosted tools, only function tools the client runs.", param: "tools");
        var function = new JsonObject { ["name"] = t["name"]?.DeepClone() ?? throw new ApiException(400, $"tools[{index}] has no 'name'.", param: "tools") };
        if (t["description"] is { } description) function["description"] = description.DeepClone();
        if (t["parameters"] is { } parameters && parameters.GetValueKind() != JsonValueKind.Null) function["parameters"] = parameters.DeepClone();
        return new JsonObject { ["type"] = "function", ["function"] = function };
    }

    private static JsonNode ChatToolChoice(JsonNode choice) => choice switch
    {
        JsonValue v when v.GetValueKind() == JsonValueKind.String => v.DeepClone(),
        JsonObject o when o["type"]?.GetValue<string>() == "function" && o["name"] is { } name =>
            new JsonObject { ["type"] = "function", ["function"] = new JsonObject { ["name"] = name.DeepClone() } },
        _ => throw new ApiException(400, "tool_choice must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", \"name\": ...}.", param: "tool_choice"),
    };

    /// <summary><c>text.format</c> as a chat completion's <c>response_format</c> (the schema sits at the format's top level here).</summary>
    private static JsonObject ChatResponseFormat(JsonObject format) => format["type"]?.GetValue<string>() switch
    {
        "text" => new JsonObject { ["type"] = "text" },
        "json_object" => new JsonObject { ["type"] = "json_object" },
        "json_schema" => new JsonObject
        {
            ["type"] = "json_schema",
            ["json_schema"] = new JsonObject
            {
                ["name"] = format["name"]?.DeepClone(),
                ["schema"] = format["schema"]?.DeepClone() ?? throw new ApiException(400, "text.format of type json_schema needs 'schema'.", param: "text"),
            },
        },
        var other => throw new ApiException(400, $"text.format type '{other}' is not one of text, json_object, json_schema.", param: "text"),
    };
}

/// <summary>
/// Builds a Responses API response from the chat client's deltas: reasoning text, message text (with log-probabilities
/// when asked) and function calls become output items in the order the model produced them. When <see cref="Emit"/>
/// is set, each step is also written as the API's stream events (<c>response.created</c>, <c>output_item.added</c>,
/// <c>output_text.delta</c>, ..., <c>response.completed</c> or <c>response.incomplete</c>), numbered in sequence.
/// </summary>
internal sealed class ResponseAssembler(string id, long createdAt, string model, JsonObject echo)
{
    private readonly JsonArray _output = [];
    private JsonObject? _open;            // the reasoning or message item being written
    private readonly StringBuilder _openText = new();
    private JsonArray _openLogprobs = [];
    private int _sequence;

    /// <summary>Writes one stream event (its type, and its data, to which the type and sequence number are added).</summary>
    public Action<string, JsonObject>? Emit { get; set; }
    /// <summary>Whether the response is kept in the server's store (its <c>store</c> field).</summary>
    public bool Stored { get; init; }
    /// <summary>The stored response this one continues, or null.</summary>
    public string? PreviousResponseId { get; init; }

    private void Event(string type, JsonObject data)
    {
        if (Emit is null) return;
        var full = new JsonObject { ["type"] = type, ["sequence_number"] = _sequence++ };
        foreach (var (key, value) in data) full[key] = value?.DeepClone();
        Emit(type, full);
    }

    /// <summary>The response object: the request's settings, the status, the output items and (when done) the usage.</summary>
    private JsonObject Response(string status, JsonNode? incomplete, JsonObject? usage)
    {
        var response = new JsonObject
        {
            ["id"] = id, ["object"] = "response", ["created_at"] = createdAt, ["status"] = status, ["background"] = false, ["error"] = null,
            ["incomplete_details"] = incomplete, ["model"] = model, ["output"] = _output.DeepClone(), ["previous_response_id"] = PreviousResponseId,
            ["store"] = Stored, ["truncation"] = "disabled", ["usage"] = usage,
        };
        foreach (var (key, value) in echo) response[key] = value?.DeepClone();
        return response;
    }

    public void Start()
    {
        Event("response.created", new JsonObject { ["response"] = Response("in_progress", null, null) });
        Event("response.in_progress", new JsonObject { ["response"] = Response("in_progress", null, null) });
    }

    public void Add(ChatTurn.DeltaEvent delta)
    {
        if (delta.Field == "reasoning_content" && delta.Text is { Length: > 0 } reasoning)
        {
            Open("reasoning");
            _openText.Append(reasoning);
            if (Emit is not null) Event("response.reasoning_text.delta", Part(new JsonObject { ["delta"] = reasoning })); // per token: built only when streaming
        }
        else if (delta.Field == "content" && (delta.Text is { Length: > 0 } || delta.Logprobs is not null))
        {
            Open("message");
            var text = delta.Text ?? "";
            _openText.Append(text);
            var logprobs = delta.Logprobs?["content"] as JsonArray ?? [];
            foreach (var entry in logprobs) _openLogprobs.Add(entry?.DeepClone());
            if (Emit is not null) Event("response.output_text.delta", Part(new JsonObject { ["delta"] = text, ["logprobs"] = logprobs.DeepClone() }));
        }
        else if (delta.ToolCalls is { } calls)
        {
            Close();
            foreach (var call in calls)
            {
                string name = call!["function"]!["name"]!.GetValue<string>(), arguments = call["function"]!["arguments"]!.GetValue<string>();
                var item = new JsonObject
                {
                    ["id"] = $"fc_{Guid.NewGuid():N}", ["type"] = "function_call", ["status"] = "in_progress",
                    ["call_id"] = call["id"]!.GetValue<string>(), ["name"] = name, ["arguments"] = "",
                };
                int index = _output.Count;
                Event("response.output_item.added", new JsonObject { ["output_index"] = index, ["item"] = item.DeepClone() });
                Event("response.function_call_arguments.delta", new JsonObject { ["item_id"] = item["id"]!.DeepClone(), ["output_index"] = index, ["delta"] = arguments });
                Event("response.function_call_arguments.done", new JsonObject { ["item_id"] = item["id"]!.DeepClone(), ["output_index"] = index, ["name"] = name, ["arguments"] = arguments });
                item["arguments"] = arguments;
                item["status"] = "completed";
                _output.Add(item);
                Event("response.output_item.done", new JsonObject { ["output_index"] = index, ["item"] = item.DeepClone() });
            }
        }
    }

    /// <summary>An event's place: the open item, its index in the output, the content part (always the first).</summary>
    private JsonObject Part(JsonObject data)
    {
        data["item_id"] = _open!["id"]!.DeepClone();
        data["output_index"] = _output.Count;
        data["content_index"] = 0;
        return data;
    }

    private void Open(string type)
    {
        if (_open?["type"]?.GetValue<string>() == type) return;
        Close();
        _open = type == "reasoning"
            ? new JsonObject { ["id"] = $"rs_{Guid.NewGuid():N}", ["type"] = "reasoning", ["summary"] = new JsonArray(), ["content"] = new JsonArray() }
            : new JsonObject { ["id"] = $"msg_{Guid.NewGuid():N}", ["type"] = "message", ["status"] = "in_progress", ["role"] = "assistant", ["content"] = new JsonArray() };
        Event("response.output_item.added", new JsonObject { ["output_index"] = _output.Count, ["item"] = _open.DeepClone() });
        if (type == "message")
            Event("response.content_part.added", Part(new JsonObject { ["part"] = TextPart("", []) }));
    }

    private static JsonObject TextPart(string text, JsonArray logprobs) =>
        new() { ["type"] = "output_text", ["text"] = text, ["annotations"] = new JsonArray(), ["logprobs"] = logprobs.DeepClone() };

    private void Close()
    {
        if (_open is null) return;
        var item = _open;
        string text = _openText.ToString();
        if (item["type"]!.GetValue<string>() == "reasoning")
        {
            Event("response.reasoning_text.done", Part(new JsonObject { ["text"] = text }));
            item["content"] = new JsonArray(new JsonObject { ["type"] = "reasoning_text", ["text"] = text });
        }
        else
        {
            var part = TextPart(text, _openLogprobs);
            Event("response.output_text.done", Part(new JsonObject { ["text"] = text, ["logprobs"] = _openLogprobs.DeepClone() }));
            Event("response.content_part.done", Part(new JsonObject { ["part"] = part.DeepClone() }));
            item["content"] = new JsonArray(part);
            item["status"] = "completed";
        }
        Event("response.output_item.done", new JsonObject { ["output_index"] = _output.Count, ["item"] = item.DeepClone() });
        _output.Add(item);
        _open = null;
        _openText.Clear();
        _openLogprobs = [];
    }

    /// <summary>Ends a stream that failed part-way: the items so far, status failed and the error, as <c>response.failed</c>.</summary>
    public void Fail(string code, string message)
    {
        Close();
        var response = Response("failed", null, null);
        response["error"] = new JsonObject { ["code"] = code, ["message"] = message };
        Event("response.failed", new JsonObject { ["response"] = response });
    }

    /// <summary>Closes the open item and returns the finished response (and, when streaming, sends it as the last event).</summary>
    public JsonObject Finish(ChatTurn turn)
    {
        Close();
        var usage = turn.Usage;
        long input = usage?.InputTokenCount ?? turn.PromptTokens, output = usage?.OutputTokenCount ?? turn.CompletionTokens;
        var usageJson = new JsonObject
        {
            ["input_tokens"] = input, ["input_tokens_details"] = new JsonObject { ["cached_tokens"] = usage?.CachedInputTokenCount ?? 0 },
            ["output_tokens"] = output, ["output_tokens_details"] = new JsonObject { ["reasoning_tokens"] = usage?.ReasoningTokenCount ?? 0 },
            ["total_tokens"] = input + output,
        };
        bool cut = turn.FinishReason == "length";
        var response = Response(cut ? "incomplete" : "completed", cut ? new JsonObject { ["reason"] = "max_output_tokens" } : null, usageJson);
        Event(cut ? "response.incomplete" : "response.completed", new JsonObject { ["response"] = response.DeepClone() });
        return response;
    }
}
