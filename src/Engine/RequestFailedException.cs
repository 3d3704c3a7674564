namespace LocalVllm.Engine;

/// <summary>A request failed in its own processing (detokenizer, stop condition); other requests were not affected.</summary>
public sealed class RequestFailedException(string message, Exception inner) : Exception(message, inner);
