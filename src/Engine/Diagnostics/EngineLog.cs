using Microsoft.Extensions.Logging;

namespace LocalVllm.Engine.Diagnostics;

/// <summary>Structured log lines for rejected and failed requests.</summary>
internal static partial class EngineLog
{
    [LoggerMessage(EventId = 1, Level = LogLevel.Warning, Message = "Request {RequestId} rejected: {Reason}")]
    public static partial void Rejected(ILogger logger, string requestId, string reason);

    [LoggerMessage(EventId = 2, Level = LogLevel.Error, Message = "Request {RequestId} failed: {Reason}")]
    public static partial void Failed(ILogger logger, string requestId, string reason);
}
