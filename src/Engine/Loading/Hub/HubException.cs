namespace LocalVllm.Engine.Loading.Hub;

/// <summary>A hub request failed in a way the user can act on; the message says what to do.</summary>
public sealed class HubException(string message, Exception? inner = null) : Exception(message, inner);
