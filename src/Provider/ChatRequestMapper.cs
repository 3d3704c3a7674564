using System.Text.Json;
using System.Text.Json.Nodes;
using LocalVllm.Engine;
using LocalVllm.Engine.Models;
using Microsoft.Extensions.AI;

namespace LocalVllm;

/// <summary>A chat request translated for the engine: the template's inputs and the sampling parameters.</summary>
internal sealed record MappedRequest(JsonArray Messages, JsonArray? Tools, Dictionary<string, JsonNode?> ExtraContext, ChatOptions? Options);

/// <summary>
/// Maps Microsoft.Extensions.AI messages and options onto the chat template's variables and the engine's
/// <see cref="SamplingParams"/>; every option is either honoured or rejected with a message that names it.
/// </summary>
internal static class ChatRequestMapper
{
    /// <summary>Engine knobs accepted through <see cref="ChatOptions.AdditionalProperties"/>.</summary>
    public static readonly string[] AdditionalPropertyNames = ["min_p", "repetition_penalty", "enable_thinking", "min_tokens", "ignore_eos", "top_k", "logprobs", "structured_outputs", "logit_bias",
        "continue_final_message", "add_generation_prompt", "stop_token_ids", "include_stop_str_in_output", "allowed_token_ids", "priority", "bad_words", "truncate_prompt_tokens", "prompt_logprobs", "cache_salt"];

    /// <summary>
    /// vLLM's <c>continue_final_message</c> and <c>add_generation_prompt</c> from <paramref name="o"/>: continuing leaves
    /// the final message open (the model goes on with it: a prefilled reply) and then adds no generation prompt;
    /// otherwise the generation prompt is added unless <c>add_generation_prompt</c> is false. Both true is an
    /// <see cref="ArgumentException"/>.
    /// </summary>
    public static (bool Continue, bool AddGenerationPrompt) PromptEnd(ChatOptions? o)
    {
        bool continuing = Extra<bool>(o, "continue_final_message") ?? false;
        bool? generation = Extra<bool>(o, "add_generation_prompt");
        if (continuing && generation == true)
            throw new ArgumentException("AdditionalProperties[\"continue_final_message\"] and [\"add_generation_prompt\"] (continue_final_message, add_generation_prompt) cannot both be true: a continued final message takes no generation prompt after it.", nameof(o));
        return (continuing, generation ?? !continuing);
    }

    /// <summary>The LoRA adapter a model id names (case-insensitively, as model ids are compared), or null.</summary>
    public static LoraRequest? Adapter(string? modelId, IReadOnlyList<LoraRequest>? adapters) =>
        modelId is null ? null : adapters?.FirstOrDefault(a => string.Equals(a.Name, modelId, StringComparison.OrdinalIgnoreCase));

    public static MappedRequest Map(IEnumerable<ChatMessage> messages, ChatOptions? options, string modelId, IReadOnlyList<LoraRequest>? adapters = null)
    {
        ArgumentNullException.ThrowIfNull(messages);
        var list = messages.ToList();
        int nullAt = list.IndexOf(null!);
        if (nullAt >= 0) throw new ArgumentException($"Message {nullAt} of the list is null.", nameof(messages));
        if (list.Count == 0) throw new ArgumentException("The message list is empty: a chat request needs at least one message.", nameof(messages));
        if (options?.ModelId is string requested && !string.Equals(requested, modelId, StringComparison.OrdinalIgnoreCase) && Adapter(requested, adapters) is null)
            throw new ArgumentException($"ChatOptions.ModelId '{requested}' does not match the loaded model '{modelId}'" +
                (adapters is { Count: > 0 } ? $" or a LoRA adapter ({string.Join(", ", adapters.Select(a => $"'{a.Name}'"))})." : "."), nameof(options));
        if (options?.ConversationId is { } conversation)
            throw new NotSupportedException($"ChatOptions.ConversationId ('{conversation}') is not supported: LocalVllm keeps no conversation state on its side; send the whole history in the messages (the prefix cache makes the repeated turns cheap).");
        if (options?.AdditionalProperties is { Count: > 0 } extraProperties)
            foreach (var key in extraProperties.Keys)
                if (!AdditionalPropertyNames.Contains(key, StringComparer.Ordinal))
                    throw new NotSupportedException($"ChatOptions.AdditionalProperties[\"{key}\"] is not supported; the keys LocalVllm reads are {string.Join(", ", AdditionalPropertyNames)}.");

        var json = new JsonArray();
        if (options?.Instructions is { Length: > 0 } instructions)
            json.Add(new JsonObject { ["role"] = "system", ["content"] = instructions });
        var knownCalls = new HashSet<string>(StringComparer.Ordinal);
        for (int index = 0; index < list.Count; index++)
        {
            var m = list[index];
            foreach (var content in m.Contents)
                if (content is not (TextContent or TextReasoningContent or FunctionCallContent or FunctionResultContent or UsageContent))
                    throw new NotSupportedException(
                        $"Message {index} ({m.Role}) holds {(content is DataContent d ? $"DataContent of media type '{d.MediaType}'" : content.GetType().Name)}, which LocalVllm cannot " +
                        "send to the model: it serves text-only models and reads text, reasoning, function calls and function results.");
            var results = m.Contents.OfType<FunctionResultContent>().ToList();
            if (results.Count > 0)
            {
                foreach (var r in results)
                {
                    if (!knownCalls.Contains(r.CallId))
                        throw new ArgumentException($"A tool result refers to call id '{r.CallId}', which no earlier assistant message made.", nameof(messages));
                    json.Add(new JsonObject { ["role"] = "tool", ["tool_call_id"] = r.CallId, ["content"] = ResultText(r.Result) });
                }
                continue;
            }
            var role = m.Role.Value;
            var obj = new JsonObject { ["role"] = role, ["content"] = string.Concat(m.Contents.OfType<TextContent>().Select(t => t.Text)) };
            var reasoning = string.Concat(m.Contents.OfType<TextReasoningContent>().Select(t => t.Text));
            if (reasoning.Length > 0) obj["reasoning_content"] = reasoning;
            var calls = m.Contents.OfType<FunctionCallContent>().ToList();
            if (calls.Count > 0)
            {
                var arr = new JsonArray();
                foreach (var c in calls)
                {
                    knownCalls.Add(c.CallId);
                    arr.Add(new JsonObject
                    {
                        ["id"] = c.CallId,
                        ["type"] = "function",
                        ["function"] = new JsonObject { ["name"] = c.Name, ["arguments"] = JsonSerializer.SerializeToNode(c.Arguments ?? new Dictionary<string, object?>()) },
                    });
                }
                obj["tool_calls"] = arr;
            }
            json.Add(obj);
        }
        // Instructions join an existing leading system message rather than adding a second one.
        if (json.Count > 1 && options?.Instructions is { Length: > 0 } && json[1]!["role"]!.GetValue<string>() == "system")
        {
            var merged = options.Instructions + "\n\n" + json[1]!["content"]!.GetValue<string>();
            json.RemoveAt(1);
            json[0]!["content"] = merged;
        }

        JsonArray? tools = null;
        if (options?.Tools is { Count: > 0 } && options.ToolMode is not NoneChatToolMode)
        {
            if (options.ToolMode is RequiredChatToolMode { RequiredFunctionName: { } required } && !options.Tools.Any(t => t.Name == required))
                throw new ArgumentException($"ChatOptions.ToolMode requires the tool '{required}', which is not among ChatOptions.Tools ({string.Join(", ", options.Tools.Select(t => t.Name))}).", nameof(options));
            tools = [];
            foreach (var tool in options.Tools)
            {
                if (tool is not AIFunctionDeclaration f)
                    throw new NotSupportedException($"Tool '{tool.Name}' of type {tool.GetType().Name} is not supported; only function tools are.");
                var schema = f.JsonSchema;
                if (schema.ValueKind != JsonValueKind.Object)
                    throw new ArgumentException($"Tool '{f.Name}' has a malformed JSON schema: expected an object, got {schema.ValueKind}.", nameof(options));
                tools.Add(new JsonObject
                {
                    ["type"] = "function",
                    ["function"] = new JsonObject
                    {
                        ["name"] = f.Name,
                        ["description"] = f.Description,
                        ["parameters"] = JsonNode.Parse(schema.GetRawText()),
                    },
                });
            }
        }

        var extra = new Dictionary<string, JsonNode?>();
        bool? thinking = null;
        if (options?.AdditionalProperties?.TryGetValue("enable_thinking", out _) == true)
            thinking = Extra<bool>(options, "enable_thinking")
                ?? throw new ArgumentException("AdditionalProperties[\"enable_thinking\"] is null; it must be true or false.", nameof(options));
        // ChatOptions.Reasoning: effort None turns thinking off, any other effort on (the effort is not graded further:
        // the templates have one switch); given together with enable_thinking, the two must agree.
        if (options?.Reasoning?.Effort is { } effort)
        {
            bool wanted = effort != ReasoningEffort.None;
            if (thinking is { } explicitThinking && explicitThinking != wanted)
                throw new ArgumentException($"ChatOptions.Reasoning.Effort = {effort} contradicts AdditionalProperties[\"enable_thinking\"] = {explicitThinking}.", nameof(options));
            thinking = wanted;
        }
        if (thinking is { } on) extra["enable_thinking"] = JsonValue.Create(on);
        return new MappedRequest(json, tools, extra, options);
    }

    public static SamplingParams ToSampling(ChatOptions? o, GenerationConfig defaults, int promptTokens, int maxModelLen)
    {
        // Value ranges are the engine's RequestValidator's to check (the same rules and messages on every path); here
        // only what is chat-specific: the room the rendered prompt leaves in the context.
        int? truncate = ChatRequestMapper.Extra<int>(o, "truncate_prompt_tokens");
        if (truncate > 0) promptTokens = Math.Min(promptTokens, truncate.Value); // what the engine will keep
        int room = Math.Max(1, maxModelLen - promptTokens);

        T? Extra<T>(string key) where T : struct => ChatRequestMapper.Extra<T>(o, key);

        bool sample = o?.Temperature is not null || defaults.DoSample;
        float temperature = o?.Temperature ?? (defaults.DoSample ? defaults.Temperature ?? 1f : 0f);
        return new SamplingParams
        {
            Temperature = temperature,
            TopP = o?.TopP ?? (sample ? defaults.TopP ?? 1f : 1f),
            TopK = o?.TopK ?? Extra<int>("top_k") ?? (sample ? defaults.TopK ?? 0 : 0),
            MinP = Extra<float>("min_p") ?? (sample ? defaults.MinP ?? 0f : 0f),
            RepetitionPenalty = Extra<float>("repetition_penalty") ?? defaults.RepetitionPenalty ?? 1f,
            PresencePenalty = o?.PresencePenalty ?? 0f,
            FrequencyPenalty = o?.FrequencyPenalty ?? 0f,
            Seed = o?.Seed,
            MaxTokens = Math.Min(o?.MaxOutputTokens ?? defaults.MaxNewTokens ?? room, room),
            MinTokens = Extra<int>("min_tokens") ?? 0,
            IgnoreEos = Extra<bool>("ignore_eos") ?? false,
            Logprobs = Extra<int>("logprobs"),
            LogitBias = LogitBias(o),
            Stop = o?.StopSequences?.ToArray() ?? [],
            IncludeStopStrInOutput = Extra<bool>("include_stop_str_in_output") ?? false,
            StopTokenIds = TokenIds(o, "stop_token_ids") ?? [],
            AllowedTokenIds = TokenIds(o, "allowed_token_ids"),
            Priority = Extra<int>("priority") ?? 0,
            CacheSalt = ExtraString(o, "cache_salt"),
            BadWords = Words(o, "bad_words") ?? [],
            TruncatePromptTokens = truncate,
            PromptLogprobs = Extra<int>("prompt_logprobs"),
            OutputKind = RequestOutputKind.Delta,
        };
    }

    /// <summary>
    /// <c>AdditionalProperties["logit_bias"]</c>: token id -> bias, as a dictionary keyed by int or by the id's text (as
    /// OpenAI's JSON has it), or a <see cref="JsonElement"/> object of that shape; anything else names the key.
    /// </summary>
    internal static IReadOnlyDictionary<int, float>? LogitBias(ChatOptions? o)
    {
        if (o?.AdditionalProperties?.TryGetValue("logit_bias", out var v) != true || v is null) return null;
        static int Id(string key) => int.TryParse(key, System.Globalization.NumberStyles.Integer, System.Globalization.CultureInfo.InvariantCulture, out var id)
            ? id : throw new ArgumentException($"AdditionalProperties[\"logit_bias\"] has the key '{key}', which is not a token id.", "options");
        return v switch
        {
            IReadOnlyDictionary<int, float> ids => ids,
            IDictionary<int, float> ids => ids.ToDictionary(),
            IDictionary<string, float> texts => texts.ToDictionary(kv => Id(kv.Key), kv => kv.Value),
            JsonElement { ValueKind: JsonValueKind.Object } e => e.EnumerateObject().ToDictionary(p => Id(p.Name), p => p.Value.GetSingle()),
            _ => throw new ArgumentException($"AdditionalProperties[\"logit_bias\"] must map token ids to biases (a dictionary or a JSON object), not {v.GetType().Name}.", "options"),
        };
    }

    /// <summary>
    /// The constraint a call asks for, or null: <see cref="ChatOptions.ResponseFormat"/> JSON (any object) or a JSON
    /// schema; <see cref="ChatToolMode.RequireAny"/> (one or more <c>&lt;tool_call&gt;</c> blocks, each a call of one of
    /// the tools with arguments valid under its parameter schema) or <c>RequireSpecific</c> (calls of that tool). When
    /// the rendered prompt leaves a <c>&lt;think&gt;</c> section open (a thinking model with thinking on), the constraint
    /// starts after <c>&lt;/think&gt;</c>. With tools in <c>Auto</c> mode (and no JSON response format), text is free
    /// but a <c>&lt;tool_call&gt;</c> the model opens is held to the tools' schemas (strict tools). A model that writes
    /// calls as bare JSON (<see cref="ToolCallFormat.BareJson"/>, Llama 3) gets the required calls in its own form,
    /// <c>{"name": ..., "parameters": {...}}</c> separated by <c>;</c>, and a Mistral model a JSON array of
    /// <c>{"name": ..., "arguments": {...}}</c> (its <c>[TOOL_CALLS]</c> marker is a control token the grammar cannot
    /// hold). In <c>Auto</c> mode their replies are either those calls or text that does not start with the call's
    /// first character (<c>{</c> or <c>[</c>, nor white space before it), which is how the parser tells the two apart.
    /// </summary>
    public static StructuredOutputs? Constraint(ChatOptions? o, string renderedPrompt, string templateSource) =>
        Constraint(o, renderedPrompt, templateSource, ToolCallFormats.Of(templateSource));

    /// <summary>As above, with the template's tool-call format already read (<see cref="ToolCallFormats.Of"/>).</summary>
    public static StructuredOutputs? Constraint(ChatOptions? o, string renderedPrompt, string templateSource, ToolCallFormat format)
    {
        StructuredOutputs? c = null;
        if (o?.AdditionalProperties?.TryGetValue("structured_outputs", out var so) == true && so is not null)
            c = StructuredOutputsJson.FromAdditionalProperty(so);
        else if (ToolCallFormats.ToolsOn(o) && (o!.ToolMode is RequiredChatToolMode || o.ResponseFormat is not ChatResponseFormatJson))
        {
            var required = o.ToolMode as RequiredChatToolMode;
            var chosen = o.Tools!.OfType<AIFunctionDeclaration>().Where(t => required?.RequiredFunctionName is null || t.Name == required.RequiredFunctionName).ToList();
            var grammar = new System.Text.StringBuilder();
            string separator = format switch { ToolCallFormat.BareJson => "; ", ToolCallFormat.Mistral => ", ", _ => "\n" };
            var (open, close) = format == ToolCallFormat.Mistral ? ("\"[\" ", " \"]\"") : ("", "");
            string calls = o.AllowMultipleToolCalls == false ? $"{open}call{close}" : $"{open}call ({GbnfLiteral(separator)} call)*{close}";
            if (required is null && format == ToolCallFormat.Hermes)
                // Auto (strict tools): free text, but once the model opens <tool_call> the call is held to the tools' schemas.
                grammar.AppendLine(o.AllowMultipleToolCalls == false ? "root ::= text (call text)?" : "root ::= text (call text)*")
                    .AppendLine("text ::= %text_without(\"<tool_call>\")");
            else if (required is null)
                // Auto, tagless forms: the calls, or text whose first character cannot begin them.
                grammar.AppendLine($"root ::= {calls} | text")
                    .AppendLine($"text ::= ([^{(format == ToolCallFormat.Mistral ? "\\[" : "{")} \\t\\n\\r] .*)?");
            else
                grammar.AppendLine($"root ::= {calls}");
            var alternatives = string.Join(" | ", chosen.Select((_, i) => $"tool{i}"));
            grammar.AppendLine(format != ToolCallFormat.Hermes
                ? $"call ::= {alternatives}"
                : $"call ::= \"<tool_call>\\n\" ({alternatives}) \"\\n</tool_call>\"");
            for (int i = 0; i < chosen.Count; i++)
                grammar.AppendLine($"tool{i} ::= {GbnfLiteral(ToolCallFormats.CallHead(format, chosen[i].Name))} %json{chosen[i].JsonSchema.GetRawText()} \"}}\"");
            c = StructuredOutputs.ForGrammar(grammar.ToString());
        }
        else if (o?.ResponseFormat is ChatResponseFormatJson json)
            c = json.Schema is { ValueKind: JsonValueKind.Object or JsonValueKind.True or JsonValueKind.False } schema ? StructuredOutputs.ForJsonSchema(schema.GetRawText()) : StructuredOutputs.ForJsonObject();
        if (c is null) return null;
        bool thinkingOpen = templateSource.Contains("</think>", StringComparison.Ordinal)
            && !renderedPrompt.TrimEnd().EndsWith("</think>", StringComparison.Ordinal);
        return thinkingOpen ? c with { ReasoningEnd = "</think>" } : c;
    }

    private static string GbnfLiteral(string s) =>
        "\"" + s.Replace("\\", "\\\\", StringComparison.Ordinal).Replace("\"", "\\\"", StringComparison.Ordinal).Replace("\n", "\\n", StringComparison.Ordinal) + "\"";

    /// <summary>
    /// An engine knob from <see cref="ChatOptions.AdditionalProperties"/>, given as a value of the right type, a string
    /// or a <see cref="JsonElement"/> (as settings loaded from JSON or YAML arrive); anything else is an
    /// <see cref="ArgumentException"/> naming the key, the value and the type expected.
    /// </summary>
    /// <summary>A text knob from <see cref="ChatOptions.AdditionalProperties"/>: a string or a JSON string; anything else is an <see cref="ArgumentException"/> naming the key.</summary>
    internal static string? ExtraString(ChatOptions? o, string key) =>
        o?.AdditionalProperties?.TryGetValue(key, out var v) != true || v is null ? null
        : v switch
        {
            string s => s,
            JsonElement { ValueKind: JsonValueKind.String } e => e.GetString(),
            JsonElement { ValueKind: JsonValueKind.Null } => null,
            _ => throw new ArgumentException($"ChatOptions.AdditionalProperties[\"{key}\"] must be a string, not {v}.", nameof(o)),
        };

    internal static T? Extra<T>(ChatOptions? o, string key) where T : struct
    {
        if (o?.AdditionalProperties?.TryGetValue(key, out var v) != true || v is null) return null;
        var culture = System.Globalization.CultureInfo.InvariantCulture;
        object? value = v is JsonElement e
            ? e.ValueKind switch { JsonValueKind.True => true, JsonValueKind.False => false, JsonValueKind.Null => null, JsonValueKind.String => e.GetString(), _ => e.GetRawText() }
            : v;
        if (value is null) return null;
        try
        {
            if (typeof(T) == typeof(bool))
                return value switch
                {
                    bool flag => (T)(object)flag,
                    string b when b.Trim().Equals("true", StringComparison.OrdinalIgnoreCase) => (T)(object)true,
                    string b when b.Trim().Equals("false", StringComparison.OrdinalIgnoreCase) => (T)(object)false,
                    _ => throw new FormatException(),
                };
            if (value is bool) throw new FormatException();
            return (T)Convert.ChangeType(value, typeof(T), culture);
        }
        catch (Exception ex) when (ex is FormatException or InvalidCastException or OverflowException)
        {
            string expected = typeof(T) == typeof(bool) ? "true or false" : typeof(T) == typeof(int) ? "an integer" : "a number";
            throw new ArgumentException($"AdditionalProperties[\"{key}\"] = '{value}' is not valid: it must be {expected}.", nameof(o), ex);
        }
    }

    /// <summary>
    /// A list of token ids from <see cref="ChatOptions.AdditionalProperties"/> (<c>stop_token_ids</c>,
    /// <c>allowed_token_ids</c>): a collection of ints, or a JSON array of them; anything else names the key.
    /// </summary>
    internal static int[]? TokenIds(ChatOptions? o, string key)
    {
        if (o?.AdditionalProperties?.TryGetValue(key, out var v) != true || v is null) return null;
        try
        {
            return v switch
            {
                IEnumerable<int> ids => ids.ToArray(),
                JsonElement { ValueKind: JsonValueKind.Array } e => e.EnumerateArray().Select(x => x.GetInt32()).ToArray(),
                JsonArray a => a.Select(x => x!.GetValue<int>()).ToArray(),
                _ => throw new FormatException(),
            };
        }
        catch (Exception ex) when (ex is FormatException or InvalidOperationException or NullReferenceException)
        {
            throw new ArgumentException($"AdditionalProperties[\"{key}\"] must be a list of token ids (integers).", nameof(o), ex);
        }
    }

    /// <summary>A list of strings from <see cref="ChatOptions.AdditionalProperties"/> (<c>bad_words</c>): strings, or a JSON array of them.</summary>
    internal static string[]? Words(ChatOptions? o, string key)
    {
        if (o?.AdditionalProperties?.TryGetValue(key, out var v) != true || v is null) return null;
        return v switch
        {
            string one => [one],
            IEnumerable<string> words => words.ToArray(),
            JsonElement { ValueKind: JsonValueKind.Array } e when e.EnumerateArray().All(x => x.ValueKind == JsonValueKind.String) => e.EnumerateArray().Select(x => x.GetString()!).ToArray(),
            JsonArray a when a.All(x => x is JsonValue t && t.GetValueKind() == JsonValueKind.String) => a.Select(x => x!.GetValue<string>()).ToArray(),
            _ => throw new ArgumentException($"AdditionalProperties[\"{key}\"] must be a list of strings.", nameof(o)),
        };
    }

    private static string ResultText(object? result) => result switch
    {
        null => "",
        string s => s,
        JsonElement e when e.ValueKind == JsonValueKind.String => e.GetString() ?? "",
        _ => JsonSerializer.Serialize(result),
    };
}
