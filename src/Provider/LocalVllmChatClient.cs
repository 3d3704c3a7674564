using System.Runtime.CompilerServices;
using System.Text.Json;
using LocalVllm.Engine;
using LocalVllm.Engine.Text.Templating;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace LocalVllm;

/// <summary>
/// An <see cref="IChatClient"/> over the in-process engine: messages are rendered with the model's own chat template,
/// tokenized and submitted; concurrent callers batch together in the engine. Reasoning (<c>&lt;think&gt;</c>) comes back as
/// <see cref="TextReasoningContent"/> and Hermes/Qwen tool calls as <see cref="FunctionCallContent"/>.
/// </summary>
public sealed partial class LocalVllmChatClient : IChatClient
{
    private readonly ILocalVllmEngine _engine;
    private readonly ILogger _logger;
    private readonly ChatClientMetadata _metadata;
    private long _nextId;

    /// <summary>Creates a client over <paramref name="engine"/>.</summary>
    public LocalVllmChatClient(ILocalVllmEngine engine, ILogger? logger = null)
    {
        ArgumentNullException.ThrowIfNull(engine);
        _engine = engine;
        _logger = logger ?? NullLogger<LocalVllmChatClient>.Instance;
        _metadata = new ChatClientMetadata("localvllm", null, engine.ModelId);
    }

    /// <inheritdoc />
    public async Task<ChatResponse> GetResponseAsync(IEnumerable<ChatMessage> messages, ChatOptions? options = null, CancellationToken cancellationToken = default)
    {
        var updates = new List<ChatResponseUpdate>();
        await foreach (var u in GetStreamingResponseAsync(messages, options, cancellationToken).ConfigureAwait(false)) updates.Add(u);
        return updates.ToChatResponse();
    }

    /// <inheritdoc />
    public async IAsyncEnumerable<ChatResponseUpdate> GetStreamingResponseAsync(IEnumerable<ChatMessage> messages, ChatOptions? options = null,
        [EnumeratorCancellation] CancellationToken cancellationToken = default)
    {
        string responseId = $"chatcmpl-{Guid.NewGuid():N}";
        int[] ids;
        SamplingParams sampling;
        try
        {
            var request = ChatRequestMapper.Map(messages, options, _engine.ModelId);
            var prompt = _engine.ChatTemplate.Render(request.Messages, request.Tools, addGenerationPrompt: true, request.ExtraContext);
            ids = _engine.EncodeChatPrompt(prompt);
            sampling = ChatRequestMapper.ToSampling(options, _engine.Defaults, ids.Length, _engine.MaxModelLen);
            _engine.Validator.Validate(ids, sampling);
        }
        catch (Exception e)
        {
            ClientLog.Rejected(_logger, responseId, e.Message);
            throw;
        }
        string messageId = $"msg-{Interlocked.Increment(ref _nextId)}";
        var created = DateTimeOffset.UtcNow;
        var parser = new ModelOutputParser();
        int outputTokens = 0;
        bool sawToolCall = false;
        RequestOutput? last = null;

        ChatResponseUpdate Update(AIContent content) => new(ChatRole.Assistant, [content])
        {
            ResponseId = responseId, MessageId = messageId, CreatedAt = created, ModelId = _engine.ModelId,
        };

        // The engine streams deltas: each output holds only the text and token ids that are new since the last one.
        await foreach (var output in _engine.GenerateAsync(ids, sampling, responseId, cancellationToken).ConfigureAwait(false))
        {
            last = output;
            if (output.Outputs.Count == 0) continue;
            var delta = output.Outputs[0];
            outputTokens += delta.TokenIds.Count;
            if (delta.Text.Length == 0) continue;
            foreach (var piece in parser.Feed(delta.Text))
                if (ToContent(piece, ref sawToolCall) is { } content) yield return Update(content);
        }
        foreach (var piece in parser.Finish())
            if (ToContent(piece, ref sawToolCall) is { } content) yield return Update(content);

        if (last is null) yield break;
        var finishReason = last.Outputs.Count > 0 ? last.Outputs[0].FinishReason : null;
        var usage = new UsageDetails
        {
            InputTokenCount = last.PromptTokenIds.Count,
            OutputTokenCount = outputTokens,
            TotalTokenCount = last.PromptTokenIds.Count + outputTokens,
            CachedInputTokenCount = last.NumCachedTokens,
        };
        var final = Update(new UsageContent(usage));
        final.FinishReason = sawToolCall ? ChatFinishReason.ToolCalls
            : finishReason == FinishReasons.Length ? ChatFinishReason.Length : ChatFinishReason.Stop;
        yield return final;
    }

    private AIContent? ToContent(OutputPiece piece, ref bool sawToolCall)
    {
        switch (piece)
        {
            case TextPiece t: return new TextContent(t.Text);
            case ReasoningPiece r: return new TextReasoningContent(r.Text);
            case ToolCallPiece c:
                if (TryParseToolCall(c.Body, out var call)) { sawToolCall = true; return call; }
                _logger.LogWarning("The model produced a malformed tool call; it is returned as text: {Body}", c.Body);
                return new TextContent("<tool_call>\n" + c.Body + "\n</tool_call>");
            default: return null;
        }
    }

    private static partial class ClientLog
    {
        [LoggerMessage(EventId = 1, Level = LogLevel.Warning, Message = "Chat request {RequestId} rejected: {Reason}")]
        public static partial void Rejected(ILogger logger, string requestId, string reason);
    }

    /// <summary>Parses <c>{"name": ..., "arguments": {...}}</c> into a call with a fresh id.</summary>
    internal static bool TryParseToolCall(string body, out FunctionCallContent call)
    {
        call = null!;
        try
        {
            using var doc = JsonDocument.Parse(body);
            var root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object || !root.TryGetProperty("name", out var name) || name.ValueKind != JsonValueKind.String) return false;
            var args = new Dictionary<string, object?>();
            if (root.TryGetProperty("arguments", out var a) || root.TryGetProperty("parameters", out a))
            {
                var obj = a.ValueKind == JsonValueKind.String ? JsonDocument.Parse(a.GetString()!).RootElement : a;
                if (obj.ValueKind != JsonValueKind.Object) return false;
                foreach (var p in obj.EnumerateObject()) args[p.Name] = p.Value.Clone();
            }
            call = new FunctionCallContent($"call_{Guid.NewGuid():N}"[..14], name.GetString()!, args);
            return true;
        }
        catch (JsonException)
        {
            return false;
        }
    }

    /// <summary>
    /// Computes the head of a conversation (system prompt, tool list, few-shot turns, a RAG document) now and pins its
    /// KV blocks, so that every later call that starts with it skips that prefill and it is never evicted. Render it
    /// with the same <paramref name="options"/> (tools) the calls will use. Returns the pin id for <see cref="UnpinAsync"/>.
    /// </summary>
    public Task<string> WarmUpAsync(IEnumerable<ChatMessage> head, ChatOptions? options = null, CancellationToken cancellationToken = default)
    {
        var request = ChatRequestMapper.Map(head, options, _engine.ModelId);
        var text = _engine.ChatTemplate.Render(request.Messages, request.Tools, addGenerationPrompt: false, request.ExtraContext);
        return _engine.PinAsync(_engine.EncodeChatPrompt(text), cancellationToken);
    }

    /// <summary>Releases a head pinned by <see cref="WarmUpAsync"/>; its blocks stay cached until evicted.</summary>
    public Task<bool> UnpinAsync(string pinId) => _engine.UnpinAsync(pinId);

    /// <inheritdoc />
    public object? GetService(Type serviceType, object? serviceKey = null)
    {
        ArgumentNullException.ThrowIfNull(serviceType);
        if (serviceKey is not null) return null;
        if (serviceType == typeof(ChatClientMetadata)) return _metadata;
        if (serviceType.IsInstanceOfType(_engine)) return _engine;
        if (_engine is LocalVllmEngine real && serviceType.IsInstanceOfType(real.Engine)) return real.Engine;
        return serviceType.IsInstanceOfType(this) ? this : null;
    }

    /// <inheritdoc />
    public void Dispose() { }
}
