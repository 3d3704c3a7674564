namespace LocalVllm.Engine;

/// <summary>An engine step (forward pass or sampling) failed; the step's requests failed with it and the engine carried on.</summary>
public sealed class EngineStepException(string message, Exception inner) : Exception(message, inner);
