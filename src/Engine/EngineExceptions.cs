using Microsoft.Extensions.Logging;

namespace LocalVllm.Engine;

/// <summary>The engine's waiting queue is full (<see cref="EngineOptions.MaxWaitingRequests"/>): the request was rejected at once; retry later.</summary>
public sealed class EngineOverloadedException(string message) : InvalidOperationException(message);

/// <summary>A request failed in its own processing (detokenizer, stop condition); other requests were not affected.</summary>
public sealed class RequestFailedException(string message, Exception inner) : Exception(message, inner);

/// <summary>An engine step (forward pass or sampling) failed; the step's requests failed with it and the engine carried on.</summary>
public sealed class EngineStepException(string message, Exception inner) : Exception(message, inner);

/// <summary>Structured log lines for rejected and failed requests.</summary>
internal static partial class EngineLog
{
    [LoggerMessage(EventId = 1, Level = LogLevel.Warning, Message = "Request {RequestId} rejected: {Reason}")]
    public static partial void Rejected(ILogger logger, string requestId, string reason);

    [LoggerMessage(EventId = 2, Level = LogLevel.Error, Message = "Request {RequestId} failed: {Reason}")]
    public static partial void Failed(ILogger logger, string requestId, string reason);
}
