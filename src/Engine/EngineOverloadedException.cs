namespace LocalVllm.Engine;

/// <summary>The engine's waiting queue is full (<see cref="EngineOptions.MaxWaitingRequests"/>): the request was rejected at once; retry later.</summary>
public sealed class EngineOverloadedException(string message) : InvalidOperationException(message);
