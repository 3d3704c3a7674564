using System.Text.Json;
using System.Text.Json.Nodes;
using LocalVllm.Engine;
using LocalVllm.Engine.Models;
using Microsoft.Extensions.AI;

namespace LocalVllm.Server;

/// <summary>
/// A <c>/v1/chat/completions</c> body read into Microsoft.Extensions.AI messages and options, so the request runs
/// through the same chat client as in-process calls; vLLM's extra sampling fields travel as AdditionalProperties.
/// </summary>
internal sealed class OpenAiChatRequest
{
    public required List<ChatMessage> Messages { get; init; }
    public required bool Stream { get; init; }
    public required bool IncludeUsage { get; init; }
    /// <summary>vLLM's <c>stream_options.continuous_usage_stats</c> (with <c>include_usage</c>): every chunk carries its choice's usage so far.</summary>
    public bool ContinuousUsage { get; init; }
    /// <summary>vLLM's <c>prompt_logprobs</c> was asked for (returned at the top of a non-streamed response).</summary>
    public bool PromptLogprobs { get; init; }
    /// <summary>
    /// vLLM's <c>echo</c>: the text of the last message, when it is the assistant's (a prefilled reply continued with
    /// <c>continue_final_message</c>), which the reply's content starts with; null otherwise.
    /// </summary>
    public string? Echo { get; init; }
    public required int N { get; init; }
    public required bool Logprobs { get; init; }
    private ChatOptions _options = new();

    /// <summary>The options of completion <paramref name="index"/> (a seeded request gives completion i the seed + i).</summary>
    public ChatOptions Options(int index)
    {
        var o = _options.Clone();
        if (o.Seed is { } seed) o.Seed = seed + index;
        return o;
    }

    private static readonly string[] Known =
    [
        "model", "messages", "stream", "stream_options", "n", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed",
        "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls", "response_format",
        "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "chat_template_kwargs", "user", "structured_outputs", "reasoning_effort", "logit_bias",
        "continue_final_message", "add_generation_prompt", "stop_token_ids", "include_stop_str_in_output", "allowed_token_ids", "priority", "bad_words", "truncate_prompt_tokens", "prompt_logprobs",
        "echo", "cache_salt", "use_beam_search", "length_penalty",
        .. StructuredOutputsJson.GuidedFields,
        // OpenAI's bookkeeping fields, which some clients always send: nothing here depends on them.
        "store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier", "modalities",
    ];

    public static OpenAiChatRequest Parse(JsonObject body)
    {
        foreach (var (key, _) in body)
            if (!Known.Contains(key)) throw new ApiException(400, $"Unknown or unsupported field '{key}'.", param: key);
        if (body["modalities"] is JsonArray modalities && modalities.Any(m => m?.GetValue<string>() != "text"))
            throw new ApiException(400, "Only the \"text\" modality is served.", param: "modalities");
        if (body["messages"] is not JsonArray { Count: > 0 } messages)
            throw new ApiException(400, "'messages' must be a non-empty array.", param: "messages");

        var o = new ChatOptions { AdditionalProperties = [] };
        // The model asked for (the server checked it: the base model or a LoRA adapter, which the chat client selects by it).
        if (body["model"] is JsonValue model && model.GetValueKind() == JsonValueKind.String) o.ModelId = model.GetValue<string>();
        o.Temperature = Float(body, "temperature");
        o.TopP = Float(body, "top_p");
        o.MaxOutputTokens = Int(body, "max_completion_tokens") ?? Int(body, "max_tokens");
        o.Seed = Long(body, "seed");
        o.PresencePenalty = Float(body, "presence_penalty");
        o.FrequencyPenalty = Float(body, "frequency_penalty");
        o.TopK = Int(body, "top_k");
        if (body["stop"] is JsonNode stop)
            o.StopSequences = stop is JsonArray list ? list.Select(s => Str(s, "stop")).ToList() : [Str(stop, "stop")];
        foreach (var extra in new[] { "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "continue_final_message", "add_generation_prompt", "include_stop_str_in_output", "priority", "truncate_prompt_tokens", "prompt_logprobs", "cache_salt" })
            if (body[extra] is JsonValue v) o.AdditionalProperties[extra] = v.GetValue<JsonElement>().Clone();
        if (body["logit_bias"] is JsonObject logitBias) o.AdditionalProperties["logit_bias"] = JsonSerializer.SerializeToElement(logitBias);
        foreach (var list in new[] { "stop_token_ids", "allowed_token_ids" })
            if (Ids(body, list) is { } ids) o.AdditionalProperties[list] = ids;
        if (Words(body, "bad_words") is { } badWords) o.AdditionalProperties["bad_words"] = badWords;
        if (body["chat_template_kwargs"] is JsonObject kwargs)
            foreach (var (key, value) in kwargs)
            {
                if (key != "enable_thinking") throw new ApiException(400, $"chat_template_kwargs '{key}' is not supported; enable_thinking is.", param: "chat_template_kwargs");
                if (value is not null) o.AdditionalProperties["enable_thinking"] = value.GetValue<JsonElement>().Clone();
            }
        // OpenAI's reasoning_effort: "none" turns the template's thinking off, any other effort on (as ChatOptions.Reasoning).
        if (body["reasoning_effort"] is JsonNode effort)
            o.Reasoning = new ReasoningOptions
            {
                Effort = Str(effort, "reasoning_effort") switch
                {
                    "none" => ReasoningEffort.None,
                    "minimal" or "low" => ReasoningEffort.Low,
                    "medium" => ReasoningEffort.Medium,
                    "high" => ReasoningEffort.High,
                    "xhigh" => ReasoningEffort.ExtraHigh,
                    var other => throw new ApiException(400, $"'reasoning_effort' '{other}' is not one of none, minimal, low, medium, high, xhigh.", param: "reasoning_effort"),
                },
            };
        bool logprobs = Bool(body, "logprobs") ?? false;
        if (logprobs) o.AdditionalProperties["logprobs"] = Int(body, "top_logprobs") ?? 0;
        else if (body["top_logprobs"] is not null) throw new ApiException(400, "'top_logprobs' needs 'logprobs': true.", param: "top_logprobs");
        if (Bool(body, "parallel_tool_calls") is bool parallel) o.AllowMultipleToolCalls = parallel;

        if (body["tools"] is JsonArray tools)
        {
            o.Tools = [];
            foreach (var t in tools)
            {
                var f = t?["function"] as JsonObject ?? throw new ApiException(400, "Each tool must be {\"type\": \"function\", \"function\": {...}}.", param: "tools");
                var name = f["name"]?.GetValue<string>() ?? throw new ApiException(400, "A tool function has no 'name'.", param: "tools");
                using var schema = JsonDocument.Parse(f["parameters"]?.ToJsonString() ?? """{"type": "object", "properties": {}}""");
                o.Tools.Add(AIFunctionFactory.CreateDeclaration(name, f["description"]?.GetValue<string>() ?? "", schema.RootElement.Clone()));
            }
        }
        switch (body["tool_choice"])
        {
            case null: break;
            case JsonValue choice when choice.GetValueKind() == JsonValueKind.String:
                o.ToolMode = choice.GetValue<string>() switch
                {
                    "auto" => ChatToolMode.Auto,
                    "none" => ChatToolMode.None,
                    "required" => ChatToolMode.RequireAny,
                    var other => throw new ApiException(400, $"tool_choice '{other}' is not one of auto, none, required.", param: "tool_choice"),
                };
                break;
            case JsonObject named:
                o.ToolMode = ChatToolMode.RequireSpecific(named["function"]?["name"]?.GetValue<string>()
                    ?? throw new ApiException(400, "A named tool_choice needs function.name.", param: "tool_choice"));
                break;
            default: throw new ApiException(400, "tool_choice must be a string or {\"type\": \"function\", \"function\": {\"name\": ...}}.", param: "tool_choice");
        }
        if (body["response_format"] is JsonObject format && format["type"]?.GetValue<string>() is { } type && type != "text")
            o.ResponseFormat = type == "json_object" ? ChatResponseFormat.Json : ChatResponseFormat.ForJsonSchema(
                (format["json_schema"]?["schema"] is JsonNode s ? JsonDocument.Parse(s.ToJsonString()).RootElement.Clone() : default));
        if (Constraint(body) is { } constraint) o.AdditionalProperties["structured_outputs"] = constraint;
        if (o.AdditionalProperties.Count == 0) o.AdditionalProperties = null;

        int n = Int(body, "n") ?? 1;
        if (n < 1) throw new ApiException(400, $"n = {n}: it must be at least 1.", param: "n");
        var parsed = messages.Select((m, i) => Message(m, i)).ToList();
        return new OpenAiChatRequest
        {
            Echo = (Bool(body, "echo") ?? false) && parsed[^1].Role == ChatRole.Assistant ? parsed[^1].Text : null,
            Messages = parsed,
            Stream = Bool(body, "stream") ?? false,
            IncludeUsage = IncludeUsageOf(body),
            ContinuousUsage = ContinuousUsageOf(body),
            PromptLogprobs = Int(body, "prompt_logprobs") is not null,
            N = n,
            Logprobs = logprobs,
            _options = o,
        };
    }

    /// <summary>vLLM's <c>structured_outputs</c> or the older <c>guided_*</c> fields, as a constraint (400 when malformed).</summary>
    public static StructuredOutputs? Constraint(JsonObject body)
    {
        try
        {
            return body["structured_outputs"] is { } so ? StructuredOutputsJson.Parse(so) : StructuredOutputsJson.FromGuidedFields(body);
        }
        catch (ArgumentException e)
        {
            throw new ApiException(400, e.Message, param: "structured_outputs");
        }
    }

    private static ChatMessage Message(JsonNode? node, int index)
    {
        if (node is not JsonObject m) throw new ApiException(400, $"messages[{index}] is not an object.", param: "messages");
        var role = m["role"]?.GetValue<string>() ?? throw new ApiException(400, $"messages[{index}] has no role.", param: "messages");
        string Text()
        {
            return m["content"] switch
            {
                null => "",
                JsonValue v when v.GetValueKind() == JsonValueKind.String => v.GetValue<string>(),
                JsonValue v when v.GetValueKind() == JsonValueKind.Null => "",
                JsonArray parts => string.Concat(parts.Select(p => p?["type"]?.GetValue<string>() == "text"
                    ? p["text"]?.GetValue<string>() ?? ""
                    : throw new ApiException(400, $"messages[{index}] holds a '{p?["type"]}' part; this server's models read text only.", param: "messages"))),
                _ => throw new ApiException(400, $"messages[{index}].content must be a string or an array of text parts.", param: "messages"),
            };
        }
        switch (role)
        {
            case "system" or "developer": return new ChatMessage(ChatRole.System, Text());
            case "user": return new ChatMessage(ChatRole.User, Text());
            case "assistant":
            {
                var contents = new List<AIContent>();
                if (Text() is { Length: > 0 } text) contents.Add(new TextContent(text));
                if (m["tool_calls"] is JsonArray calls)
                    foreach (var c in calls)
                    {
                        var f = c?["function"] ?? throw new ApiException(400, $"messages[{index}].tool_calls holds a call without 'function'.", param: "messages");
                        var args = f["arguments"] switch
                        {
                            JsonValue s when s.GetValueKind() == JsonValueKind.String => JsonNode.Parse(s.GetValue<string>()),
                            var other => other,
                        };
                        var dict = (args as JsonObject)?.ToDictionary(kv => kv.Key, kv => (object?)(kv.Value is null ? null : JsonDocument.Parse(kv.Value.ToJsonString()).RootElement.Clone()))
                            ?? new Dictionary<string, object?>();
                        contents.Add(new FunctionCallContent(c["id"]?.GetValue<string>() ?? $"call_{Guid.NewGuid():N}"[..14], f["name"]!.GetValue<string>(), dict));
                    }
                return new ChatMessage(ChatRole.Assistant, contents);
            }
            case "tool":
                return new ChatMessage(ChatRole.Tool, [new FunctionResultContent(
                    m["tool_call_id"]?.GetValue<string>() ?? throw new ApiException(400, $"messages[{index}] (tool) has no tool_call_id.", param: "messages"), Text())]);
            default:
                throw new ApiException(400, $"messages[{index}] has role '{role}'; use system, developer, user, assistant or tool.", param: "messages");
        }
    }

    internal static float? Float(JsonObject body, string key) => body[key] is JsonValue v && v.GetValueKind() != JsonValueKind.Null
        ? v.GetValueKind() == JsonValueKind.Number ? (float)v.GetValue<double>() : throw new ApiException(400, $"'{key}' must be a number.", param: key)
        : null;

    /// <summary><c>stream_options.include_usage</c>.</summary>
    internal static bool IncludeUsageOf(JsonObject body) => body["stream_options"] switch
    {
        null => false,
        JsonObject options => Bool(options, "include_usage") ?? false,
        JsonValue v when v.GetValueKind() == JsonValueKind.Null => false,
        _ => throw new ApiException(400, "'stream_options' must be an object.", param: "stream_options"),
    };

    /// <summary><c>stream_options.continuous_usage_stats</c>, which (as in vLLM) takes effect with <c>include_usage</c>.</summary>
    internal static bool ContinuousUsageOf(JsonObject body) =>
        IncludeUsageOf(body) && body["stream_options"] is JsonObject options && (Bool(options, "continuous_usage_stats") ?? false);

    internal static bool? Bool(JsonObject body, string key) => body[key] is JsonValue v && v.GetValueKind() != JsonValueKind.Null
        ? v.GetValueKind() is JsonValueKind.True or JsonValueKind.False ? v.GetValue<bool>() : throw new ApiException(400, $"'{key}' must be true or false.", param: key)
        : null;

    /// <summary>A list of token ids (<c>stop_token_ids</c>, <c>allowed_token_ids</c>), or null when absent.</summary>
    internal static int[]? Ids(JsonObject body, string key) => body[key] switch
    {
        null => null,
        JsonValue v when v.GetValueKind() == JsonValueKind.Null => null,
        JsonArray a => a.Select(x => x is JsonValue t && t.TryGetValue<int>(out var id) ? id
            : throw new ApiException(400, $"'{key}' must be an array of token ids (integers).", param: key)).ToArray(),
        _ => throw new ApiException(400, $"'{key}' must be an array of token ids (integers).", param: key),
    };

    /// <summary>A list of strings (<c>bad_words</c>), or null when absent.</summary>
    internal static string[]? Words(JsonObject body, string key) => body[key] switch
    {
        null => null,
        JsonValue v when v.GetValueKind() == JsonValueKind.Null => null,
        JsonArray a => a.Select(x => x is JsonValue t && t.GetValueKind() == JsonValueKind.String ? t.GetValue<string>()
            : throw new ApiException(400, $"'{key}' must be an array of strings.", param: key)).ToArray(),
        _ => throw new ApiException(400, $"'{key}' must be an array of strings.", param: key),
    };

    internal static int? Int(JsonObject body, string key) => body[key] is JsonValue v && v.GetValueKind() != JsonValueKind.Null
        ? v.TryGetValue<int>(out var i) ? i : throw new ApiException(400, $"'{key}' must be an integer.", param: key)
        : null;

    internal static long? Long(JsonObject body, string key) => body[key] is JsonValue v && v.GetValueKind() != JsonValueKind.Null
        ? v.TryGetValue<long>(out var i) ? i : throw new ApiException(400, $"'{key}' must be an integer.", param: key)
        : null;

    private static string Str(JsonNode? node, string key) => node is JsonValue v && v.GetValueKind() == JsonValueKind.String
        ? v.GetValue<string>()
        : throw new ApiException(400, $"'{key}' must be a string or an array of strings.", param: key);
}

/// <summary>A <c>/v1/completions</c> body: prompts (text or token ids, one or a batch) and the engine's sampling parameters.</summary>
internal static class OpenAiCompletionRequest
{
    private static int? MaxOf(int? a, int? b) => a is null ? b : b is null ? a : Math.Max(a.Value, b.Value);

    /// <summary>A prompt's token ids, and its text when it came as text (what <c>echo</c> gives back).</summary>
    public readonly record struct Prompt(int[] Ids, string? Text = null);

    public static List<Prompt> Prompts(JsonObject body, Func<string, int[]> encode)
    {
        JsonNode? p = body["prompt"];
        int[] Ids(JsonArray a) => a.Select(x => x is JsonValue v && v.TryGetValue<int>(out var id) ? id
            : throw new ApiException(400, "'prompt' token ids must be integers.", param: "prompt")).ToArray();
        return p switch
        {
            JsonValue v when v.GetValueKind() == JsonValueKind.String => [new Prompt(encode(v.GetValue<string>()), v.GetValue<string>())],
            JsonArray { Count: > 0 } a when a[0] is JsonValue first && first.GetValueKind() == JsonValueKind.Number => [new Prompt(Ids(a))],
            JsonArray { Count: > 0 } a => a.Select(x => x switch
            {
                JsonValue v when v.GetValueKind() == JsonValueKind.String => new Prompt(encode(v.GetValue<string>()), v.GetValue<string>()),
                JsonArray ids => new Prompt(Ids(ids)),
                _ => throw new ApiException(400, "'prompt' must be a string, an array of strings, token ids, or arrays of token ids.", param: "prompt"),
            }).ToList(),
            _ => throw new ApiException(400, "'prompt' is required: a string, an array of strings, token ids, or arrays of token ids.", param: "prompt"),
        };
    }

    /// <summary>OpenAI's <c>echo</c>: the prompt comes back before each completion's text (and, with logprobs, its tokens' log-probabilities).</summary>
    public static bool Echo(JsonObject body) => OpenAiChatRequest.Bool(body, "echo") ?? false;

    /// <summary>The body's sampling parameters; what it leaves unset comes from <paramref name="defaults"/> (the engine's <c>DefaultSamplingParams</c>).</summary>
    public static SamplingParams Sampling(JsonObject body, SamplingParams defaults)
    {
        foreach (var unsupported in new[] { "suffix", "best_of" })
            if (body[unsupported] is JsonValue v && v.GetValueKind() is not (JsonValueKind.Null or JsonValueKind.False))
                throw new ApiException(400, $"'{unsupported}' is not supported.", param: unsupported);
        var stop = body["stop"] switch
        {
            null => [],
            JsonArray a => a.Select(s => s!.GetValue<string>()).ToArray(),
            JsonNode s => new[] { s.GetValue<string>() },
        };
        return new SamplingParams
        {
            N = OpenAiChatRequest.Int(body, "n") ?? 1,
            // The model's defaults (generation_config.json, as vLLM applies them) or OpenAI's (temperature 1, 16 tokens).
            Temperature = OpenAiChatRequest.Float(body, "temperature") ?? defaults.Temperature,
            TopP = OpenAiChatRequest.Float(body, "top_p") ?? defaults.TopP,
            TopK = OpenAiChatRequest.Int(body, "top_k") ?? defaults.TopK,
            MinP = OpenAiChatRequest.Float(body, "min_p") ?? defaults.MinP,
            RepetitionPenalty = OpenAiChatRequest.Float(body, "repetition_penalty") ?? defaults.RepetitionPenalty,
            PresencePenalty = OpenAiChatRequest.Float(body, "presence_penalty") ?? 0f,
            FrequencyPenalty = OpenAiChatRequest.Float(body, "frequency_penalty") ?? 0f,
            MaxTokens = OpenAiChatRequest.Int(body, "max_tokens") ?? defaults.MaxTokens,
            MinTokens = OpenAiChatRequest.Int(body, "min_tokens") ?? 0,
            IgnoreEos = OpenAiChatRequest.Bool(body, "ignore_eos") ?? false,
            Seed = OpenAiChatRequest.Long(body, "seed"),
            Stop = stop,
            Logprobs = OpenAiChatRequest.Int(body, "logprobs"),
            // vLLM's prompt_logprobs; echo with logprobs needs the prompt's too, at the same number of alternatives.
            PromptLogprobs = MaxOf(OpenAiChatRequest.Int(body, "prompt_logprobs"), Echo(body) ? OpenAiChatRequest.Int(body, "logprobs") : null),
            StructuredOutputs = OpenAiChatRequest.Constraint(body),
            // vLLM's extra fields for completions.
            StopTokenIds = OpenAiChatRequest.Ids(body, "stop_token_ids") ?? [],
            IncludeStopStrInOutput = OpenAiChatRequest.Bool(body, "include_stop_str_in_output") ?? false,
            Priority = OpenAiChatRequest.Int(body, "priority") ?? 0,
            CacheSalt = body["cache_salt"] is JsonValue salt && salt.GetValueKind() == JsonValueKind.String ? salt.GetValue<string>()
                : body["cache_salt"] is null ? null : throw new ApiException(400, "'cache_salt' must be a string.", param: "cache_salt"),
            AllowedTokenIds = OpenAiChatRequest.Ids(body, "allowed_token_ids"),
            BadWords = OpenAiChatRequest.Words(body, "bad_words") ?? [],
            TruncatePromptTokens = OpenAiChatRequest.Int(body, "truncate_prompt_tokens"),
            LogitBias = body["logit_bias"] is JsonObject bias
                ? bias.ToDictionary(kv => int.TryParse(kv.Key, out var id) ? id : throw new ApiException(400, $"'logit_bias' key '{kv.Key}' is not a token id.", param: "logit_bias"),
                    kv => kv.Value!.GetValue<float>())
                : null,
            SkipSpecialTokens = OpenAiChatRequest.Bool(body, "skip_special_tokens") ?? true,
        };
    }
}
