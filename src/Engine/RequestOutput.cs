namespace LocalVllm.Engine;

/// <summary>One candidate token and its log-probability; <see cref="Rank"/> 1 is the most likely.</summary>
public readonly record struct TokenLogprob(int TokenId, float Logprob, int Rank);

/// <summary>The log-probabilities at one position: the chosen (or prompt) token's, and the top-k.</summary>
public sealed record PositionLogprobs(int TokenId, float Logprob, int Rank, IReadOnlyList<TokenLogprob> Top);

/// <summary>One completion of a request.</summary>
public sealed record CompletionOutput
{
    public required int Index { get; init; }
    /// <summary>Detokenized text (empty when the engine has no tokenizer).</summary>
    public string Text { get; init; } = "";
    public required IReadOnlyList<int> TokenIds { get; init; }
    /// <summary>Per generated token, when <see cref="SamplingParams.Logprobs"/> was set.</summary>
    public IReadOnlyList<PositionLogprobs>? Logprobs { get; init; }
    /// <summary>"stop", "length" or "abort"; null while running.</summary>
    public string? FinishReason { get; init; }
    /// <summary>The stop token id or stop string that ended it, if any.</summary>
    public object? StopReason { get; init; }
    public bool Finished => FinishReason is not null;
}

/// <summary>What a request produced (so far, while streaming).</summary>
public sealed record RequestOutput
{
    public required string RequestId { get; init; }
    /// <summary>The prompt text, when the request was made from text.</summary>
    public string? Prompt { get; init; }
    public required IReadOnlyList<int> PromptTokenIds { get; init; }
    /// <summary>Per prompt position (null at position 0), when <see cref="SamplingParams.PromptLogprobs"/> was set.</summary>
    public IReadOnlyList<PositionLogprobs?>? PromptLogprobs { get; init; }
    public required IReadOnlyList<CompletionOutput> Outputs { get; init; }
    public required bool Finished { get; init; }
    /// <summary>Why the request failed, when its finish reason is "error".</summary>
    public Exception? Error { get; init; }
    /// <summary>Prompt tokens served from the prefix cache (the largest over the request's completions).</summary>
    public int NumCachedTokens { get; init; }
    /// <summary>Seconds from arrival to the first generated token, when known.</summary>
    public double? TimeToFirstTokenSeconds { get; init; }
    /// <summary>Mean seconds per output token after the first (completion 0), once it has two or more.</summary>
    public double? TimePerOutputTokenSeconds { get; init; }
}
