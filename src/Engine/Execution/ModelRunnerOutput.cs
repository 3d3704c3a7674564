namespace LocalVllm.Engine.Execution;

/// <summary>Prompt log-probabilities computed in one step for one sequence: positions <c>FirstPosition ..</c> of its prompt.</summary>
public sealed record PromptLogprobsChunk(int FirstPosition, PositionLogprobs[] Values);

/// <summary>What one step produced for each scheduled sequence, in batch order.</summary>
/// <param name="Sampled">The sampled token, or null when the sequence's chunk did not reach the end of its known tokens.</param>
/// <param name="PromptLogprobs">The prompt log-probabilities this step computed, or null.</param>
/// <param name="AcceptedDrafts">
/// Speculative decoding: per scheduled sequence, its draft tokens the model agreed with (the sampled token follows
/// them), or null when the sequence had no drafts or the step none at all.
/// </param>
public sealed record ModelRunnerOutput(SampledToken?[] Sampled, PromptLogprobsChunk?[] PromptLogprobs, IReadOnlyList<int>?[]? AcceptedDrafts = null);
