using Microsoft.Extensions.Logging;

namespace LocalVllm.Engine.Diagnostics;

/// <summary>Structured log lines for rejected and failed requests.</summary>
internal static partial class EngineLog
{
    [LoggerMessage(EventId = 1, Level = LogLevel.Warning, Message = "Request {RequestId} rejected: {Reason}")]
    public static partial void Rejected(ILogger logger, string requestId, string reason);

    [LoggerMessage(EventId = 2, Level = LogLevel.Error, Message = "Request {RequestId} failed: {Reason}")]
    public static partial void Failed(ILogger logger, string requestId, string reason);

    [LoggerMessage(EventId = 3, Level = LogLevel.Information, Message = "KV cache: {Blocks} blocks = {Tokens} tokens, {Size} (set by {Option})")]
    public static partial void KvCache(ILogger logger, int blocks, long tokens, string size, string option);

    [LoggerMessage(EventId = 4, Level = LogLevel.Warning, Message = "The model's context of {ModelContext} tokens does not fit in the KV cache: MaxModelLen lowered to {MaxModelLen} tokens. Raise {Option} to at least {BlocksNeeded} blocks to serve the full context.")]
    public static partial void MaxModelLenLowered(ILogger logger, int modelContext, int maxModelLen, string option, int blocksNeeded);

    [LoggerMessage(EventId = 5, Level = LogLevel.Information, Message = "LoRA adapter '{Name}' (id {Id}, rank {Rank}) loaded from {Path}")]
    public static partial void LoraLoaded(ILogger logger, string name, int id, int rank, string path);
}
