using System.Runtime.CompilerServices;
using System.Text.Json;
using System.Text.RegularExpressions;
using LocalVllm.Engine;
using LocalVllm.Engine.Text.Templating;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace LocalVllm;

/// <summary>
/// An <see cref="IChatClient"/> over the in-process engine: messages are rendered with the model's own chat template,
/// tokenized and submitted; concurrent callers batch together in the engine. Reasoning (<c>&lt;think&gt;</c>) comes back as
/// <see cref="TextReasoningContent"/> and Hermes/Qwen tool calls as <see cref="FunctionCallContent"/>. Every update's
/// <see cref="ChatResponseUpdate.RawRepresentation"/> is the engine's <see cref="RequestOutput"/> it came from, and a
/// response's is the request's last one (timings, cached tokens, log-probabilities when asked for).
/// </summary>
public sealed partial class LocalVllmChatClient : IChatClient
{
    private readonly ILocalVllmEngine _engine;
    private readonly ILogger _logger;
    private readonly ChatClientMetadata _metadata;

    /// <summary>Creates a client over <paramref name="engine"/>.</summary>
    public LocalVllmChatClient(ILocalVllmEngine engine, ILogger? logger = null)
    {
        ArgumentNullException.ThrowIfNull(engine);
        _engine = engine;
        _logger = logger ?? NullLogger<LocalVllmChatClient>.Instance;
        _metadata = new ChatClientMetadata("localvllm", ProviderUriFor(engine.ModelId), engine.ModelId);
    }

    /// <summary>
    /// The URI reported as <see cref="ChatClientMetadata.ProviderUri"/> (and so as OpenTelemetry's <c>server.address</c>):
    /// <c>localvllm://localhost/&lt;model id&gt;</c>, naming the model served in this process.
    /// </summary>
    public static Uri ProviderUriFor(string modelId) => new UriBuilder("localvllm", "localhost") { Path = modelId }.Uri;

    /// <inheritdoc />
    public Task<ChatResponse> GetResponseAsync(IEnumerable<ChatMessage> messages, ChatOptions? options = null, CancellationToken cancellationToken = default)
    {
        var request = Prepare(messages, options); // argument and option errors are thrown here, not from the task
        return Collect(request, cancellationToken);
    }

    private async Task<ChatResponse> Collect(PreparedRequest request, CancellationToken cancellationToken)
    {
        var updates = new List<ChatResponseUpdate>();
        await foreach (var u in Stream(request, cancellationToken).ConfigureAwait(false)) updates.Add(u);
        var response = updates.ToChatResponse();
        response.RawRepresentation = updates.Count > 0 ? updates[^1].RawRepresentation : null;
        return response;
    }

    /// <inheritdoc />
    public IAsyncEnumerable<ChatResponseUpdate> GetStreamingResponseAsync(IEnumerable<ChatMessage> messages, ChatOptions? options = null,
        CancellationToken cancellationToken = default)
    {
        var request = Prepare(messages, options); // eager: a bad argument throws at the call, not at the first MoveNextAsync
        return Stream(request, cancellationToken);
    }

    /// <summary>A request checked, rendered and tokenized, ready to submit.</summary>
    private sealed record PreparedRequest(string ResponseId, int[] Ids, SamplingParams Sampling, ChatOptions? Options, ToolCallFormat Format, LoraRequest? Lora)
    {
        /// <summary>The model that answers: the adapter's name, or the base model's id.</summary>
        public string ModelId(string baseModel) => Lora?.Name ?? baseModel;
    }

    private PreparedRequest Prepare(IEnumerable<ChatMessage> messages, ChatOptions? options)
    {
        ArgumentNullException.ThrowIfNull(messages);
        string responseId = $"chatcmpl-{Guid.NewGuid():N}";
        try
        {
            var (prompt, ids) = RenderPrompt(messages, options);
            if (_logger.IsEnabled(LogLevel.Debug))
                ClientLog.Rendered(_logger, responseId, ids.Length, prompt.Length, prompt.Length <= PromptHeadChars ? prompt : prompt[..PromptHeadChars] + "...");
            var format = ToolCallFormats.Of(_engine.ChatTemplate.Source);
            var sampling = ChatRequestMapper.ToSampling(options, _engine.Defaults, ids.Length, _engine.MaxModelLen) with
            {
                StructuredOutputs = ChatRequestMapper.Constraint(options, prompt, _engine.ChatTemplate.Source, format),
            };
            _engine.Validator.Validate(ids, sampling);
            return new PreparedRequest(responseId, ids, sampling, options, format, ChatRequestMapper.Adapter(options?.ModelId, _engine.LoraModules));
        }
        catch (Exception e)
        {
            ClientLog.Rejected(_logger, responseId, e.Message);
            throw;
        }
    }

    /// <summary>
    /// The prompt a call with <paramref name="messages"/> and <paramref name="options"/> sends to the model: the chat
    /// template's render, with the generation prompt appended when <paramref name="addGenerationPrompt"/> is true (null:
    /// as the options say, <c>AdditionalProperties["add_generation_prompt"]</c>, true unless
    /// <c>["continue_final_message"]</c> leaves the final message open for the model to continue), and its token ids.
    /// Options are checked as a call checks them.
    /// </summary>
    public (string Text, int[] TokenIds) RenderPrompt(IEnumerable<ChatMessage> messages, ChatOptions? options = null, bool? addGenerationPrompt = null)
    {
        ArgumentNullException.ThrowIfNull(messages);
        var request = ChatRequestMapper.Map(messages, options, _engine.ModelId, _engine.LoraModules);
        var (continuing, generation) = ChatRequestMapper.PromptEnd(options);
        if (continuing && addGenerationPrompt == true)
            throw new ArgumentException("continue_final_message cannot be combined with a generation prompt.", nameof(addGenerationPrompt));
        var text = _engine.ChatTemplate.Render(request.Messages, request.Tools, !continuing && (addGenerationPrompt ?? generation), request.ExtraContext);
        if (continuing) text = LocalVllm.Engine.Text.Templating.ChatTemplate.ContinueFinalMessage(text, request.Messages);
        return (text, _engine.EncodeChatPrompt(text));
    }

    /// <summary>How much of the rendered prompt the debug log line shows.</summary>
    internal const int PromptHeadChars = 300;

    private async IAsyncEnumerable<ChatResponseUpdate> Stream(PreparedRequest request, [EnumeratorCancellation] CancellationToken cancellationToken)
    {
        string messageId = $"msg-{Guid.NewGuid():N}";
        var created = DateTimeOffset.UtcNow;
        var format = request.Format;
        var parser = new ModelOutputParser(ToolCallFormats.ToolsOn(request.Options) && format is ToolCallFormat.BareJson or ToolCallFormat.Mistral
            ? request.Options!.Tools!.Select(t => t.Name).ToHashSet() : null, format);
        var reasoning = request.Options?.Reasoning;
        bool keepReasoning = reasoning?.Output is not ReasoningOutput.None;
        bool singleCall = request.Options?.AllowMultipleToolCalls == false;
        int outputTokens = 0, reasoningTokens = 0, toolCalls = 0;
        RequestOutput? last = null;

        ChatResponseUpdate Update(AIContent content, RequestOutput raw) => new(ChatRole.Assistant, [content])
        {
            ResponseId = request.ResponseId, MessageId = messageId, CreatedAt = created, ModelId = request.ModelId(_engine.ModelId), RawRepresentation = raw,
        };

        IEnumerable<AIContent> Contents(IEnumerable<OutputPiece> pieces)
        {
            foreach (var piece in pieces)
            {
                if (piece is ReasoningPiece && !keepReasoning) continue;
                if (ToContent(piece, format) is not { } content) continue;
                if (content is FunctionCallContent call && ++toolCalls > 1 && singleCall)
                {
                    ClientLog.ExtraToolCallDropped(_logger, request.ResponseId, call.Name);
                    continue;
                }
                yield return content;
            }
        }

        // The engine streams deltas: each output holds only the text and token ids that are new since the last one.
        await foreach (var output in _engine.GenerateAsync(request.Ids, request.Sampling, request.ResponseId, request.Lora, cancellationToken).ConfigureAwait(false))
        {
            last = output;
            if (output.Outputs.Count == 0) continue;
            var delta = output.Outputs[0];
            outputTokens += delta.TokenIds.Count;
            if (delta.Text.Length == 0)
            {
                if (parser.InReasoning) reasoningTokens += delta.TokenIds.Count;
                continue;
            }
            // A token belongs to the reasoning when it is read inside <think>...</think> or opens or closes it.
            bool wasReasoning = parser.InReasoning;
            var pieces = parser.Feed(delta.Text);
            if (wasReasoning || parser.InReasoning) reasoningTokens += delta.TokenIds.Count;
            foreach (var content in Contents(pieces)) yield return Update(content, output);
        }
        if (last is null) yield break;
        foreach (var content in Contents(parser.Finish())) yield return Update(content, last);

        var finishReason = last.Outputs.Count > 0 ? last.Outputs[0].FinishReason : null;
        var usage = new UsageDetails
        {
            InputTokenCount = last.PromptTokenIds.Count,
            OutputTokenCount = outputTokens,
            TotalTokenCount = last.PromptTokenIds.Count + outputTokens,
            CachedInputTokenCount = last.NumCachedTokens,
            ReasoningTokenCount = reasoningTokens,
        };
        var final = Update(new UsageContent(usage), last);
        final.FinishReason = toolCalls > 0 ? ChatFinishReason.ToolCalls
            : finishReason == FinishReasons.Length ? ChatFinishReason.Length : ChatFinishReason.Stop;
        yield return final;
    }

    private AIContent? ToContent(OutputPiece piece, ToolCallFormat format)
    {
        switch (piece)
        {
            case TextPiece t: return new TextContent(t.Text);
            case ReasoningPiece r: return new TextReasoningContent(r.Text);
            case ToolCallPiece c:
                if (ParseToolCall(c.Body, format) is { } call)
                {
                    if (call.Exception is not null)
                        _logger.LogWarning("The model produced a tool call to {Name} whose arguments do not parse; it is returned with the error for the model: {Body}", call.Name, c.Body);
                    return call;
                }
                _logger.LogWarning("The model produced a malformed tool call naming no function; it is returned as text: {Body}", c.Body);
                return new TextContent("<tool_call>\n" + c.Body + "\n</tool_call>");
            default: return null;
        }
    }

    private static partial class ClientLog
    {
        [LoggerMessage(EventId = 1, Level = LogLevel.Warning, Message = "Chat request {RequestId} rejected: {Reason}")]
        public static partial void Rejected(ILogger logger, string requestId, string reason);

        [LoggerMessage(EventId = 2, Level = LogLevel.Debug, Message = "Chat request {RequestId}: rendered prompt of {Tokens} tokens ({Chars} characters) begins: {Head}")]
        public static partial void Rendered(ILogger logger, string requestId, int tokens, int chars, string head);

        [LoggerMessage(EventId = 3, Level = LogLevel.Debug, Message = "Chat request {RequestId}: AllowMultipleToolCalls is false; a further call to {Name} was dropped")]
        public static partial void ExtraToolCallDropped(ILogger logger, string requestId, string name);
    }

    [GeneratedRegex("\"name\"\\s*:\\s*\"(?<name>[^\"\\\\]+)\"")]
    private static partial Regex NameInBrokenCall();

    /// <summary>
    /// Parses a Hermes/Qwen tool-call body, <c>{"name": ..., "arguments": {...}}</c>, into a call with a fresh id. When
    /// the function's name can be read but its arguments cannot, the call carries the parse error in
    /// <see cref="FunctionCallContent.Exception"/> (<see cref="FunctionCallContent.CreateFromParsedArguments"/>), so that
    /// <c>FunctionInvokingChatClient</c> reports it back to the model. Returns null when no name can be found.
    /// </summary>
    internal static FunctionCallContent? ParseToolCall(string body, ToolCallFormat format = ToolCallFormat.Hermes)
    {
        string callId = ToolCallFormats.NewCallId(format);
        string? name = null;
        string arguments = "{}";
        try
        {
            using var doc = JsonDocument.Parse(body);
            var root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object || !root.TryGetProperty("name", out var n) || n.ValueKind != JsonValueKind.String) return null;
            name = n.GetString()!;
            if (root.TryGetProperty("arguments", out var a) || root.TryGetProperty("parameters", out a))
                arguments = a.ValueKind == JsonValueKind.String ? a.GetString()! : a.GetRawText();
        }
        catch (JsonException e)
        {
            var m = NameInBrokenCall().Match(body);
            if (!m.Success) return null;
            name = m.Groups["name"].Value;
            var error = e.Message;
            return FunctionCallContent.CreateFromParsedArguments<string>(body, callId, name,
                _ => throw new JsonException($"The tool call is not valid JSON: {error}"));
        }
        return FunctionCallContent.CreateFromParsedArguments(arguments, callId, name, ParseArguments);
    }

    private static Dictionary<string, object?> ParseArguments(string json)
    {
        using var doc = JsonDocument.Parse(json);
        if (doc.RootElement.ValueKind != JsonValueKind.Object)
            throw new JsonException($"The tool call's arguments must be a JSON object, not {doc.RootElement.ValueKind}.");
        var args = new Dictionary<string, object?>();
        foreach (var p in doc.RootElement.EnumerateObject()) args[p.Name] = p.Value.Clone();
        return args;
    }

    /// <summary>
    /// Computes the head of a conversation (system prompt, tool list, few-shot turns, a RAG document) now and pins its
    /// KV blocks, so that every later call that starts with it skips that prefill and it is never evicted. Render it
    /// with the same <paramref name="options"/> (tools) the calls will use. Returns the pin id for <see cref="UnpinAsync"/>.
    /// </summary>
    public Task<string> WarmUpAsync(IEnumerable<ChatMessage> head, ChatOptions? options = null, CancellationToken cancellationToken = default)
    {
        return _engine.PinAsync(RenderPrompt(head, options, addGenerationPrompt: false).TokenIds, cancellationToken);
    }

    /// <summary>Releases a head pinned by <see cref="WarmUpAsync"/>; its blocks stay cached until evicted.</summary>
    public Task<bool> UnpinAsync(string pinId) => _engine.UnpinAsync(pinId);

    /// <inheritdoc />
    /// <remarks>
    /// Exact types only for what the client wraps (<see cref="ILocalVllmEngine"/> or the engine's own type, and the
    /// <see cref="AsyncLlmEngine"/> behind a <see cref="LocalVllmEngine"/>), so <c>GetService(typeof(object))</c> returns
    /// the client itself, as Microsoft.Extensions.AI's clients do.
    /// </remarks>
    public object? GetService(Type serviceType, object? serviceKey = null)
    {
        ArgumentNullException.ThrowIfNull(serviceType);
        if (serviceKey is not null) return null;
        if (serviceType == typeof(ChatClientMetadata)) return _metadata;
        if (serviceType == typeof(ILocalVllmEngine) || serviceType == _engine.GetType()) return _engine;
        if (serviceType == typeof(AsyncLlmEngine) && _engine is LocalVllmEngine real) return real.Engine;
        return serviceType.IsInstanceOfType(this) ? this : null;
    }

    /// <inheritdoc />
    public void Dispose() { }
}
