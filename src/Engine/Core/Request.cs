namespace LocalVllm.Engine.Core;

/// <summary>One request in the engine: its prompt, its sampling parameters and its N sequences. Owned by the engine thread.</summary>
internal sealed class Request(string id, string? prompt, int[] promptIds, SamplingParams sampling, Sequence[] sequences, DateTimeOffset? deadline)
{
    public string Id { get; } = id;
    /// <summary>The prompt text, when the request was made from text.</summary>
    public string? Prompt { get; } = prompt;
    public int[] PromptIds { get; } = promptIds;
    public SamplingParams Sampling { get; } = sampling;
    public Sequence[] Sequences { get; } = sequences;
    public DateTimeOffset? Deadline { get; } = deadline;
    /// <summary>Why the request failed, once it has.</summary>
    public Exception? Error { get; set; }
    public bool Finished => Sequences.All(s => s.Status == SequenceStatus.Finished);
}
