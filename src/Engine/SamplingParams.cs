namespace LocalVllm.Engine;

/// <summary>
/// How to generate for one request, named and defaulted as in vLLM. <see cref="Temperature"/> 0 is greedy (exact
/// argmax); a request with a <see cref="Seed"/> samples the same tokens whatever else is in the batch.
/// </summary>
public sealed record SamplingParams
{
    /// <summary>Completions to generate for the prompt; they share the prompt's KV blocks.</summary>
    public int N { get; init; } = 1;
    /// <summary>Softmax temperature; 0 means greedy.</summary>
    public float Temperature { get; init; } = 1.0f;
    /// <summary>Nucleus sampling mass, in (0, 1].</summary>
    public float TopP { get; init; } = 1.0f;
    /// <summary>Keep only the K most likely tokens; 0 or -1 disables.</summary>
    public int TopK { get; init; }
    /// <summary>Drop tokens whose probability is below MinP times the most likely token's; 0 disables.</summary>
    public float MinP { get; init; }
    /// <summary>Hugging Face repetition penalty over prompt and output tokens; 1 disables.</summary>
    public float RepetitionPenalty { get; init; } = 1.0f;
    /// <summary>OpenAI presence penalty over output tokens, in [-2, 2].</summary>
    public float PresencePenalty { get; init; }
    /// <summary>OpenAI frequency penalty over output tokens, in [-2, 2].</summary>
    public float FrequencyPenalty { get; init; }
    /// <summary>Seed for this request's random draws.</summary>
    public long? Seed { get; init; }
    /// <summary>Maximum tokens to generate.</summary>
    public int MaxTokens { get; init; } = 16;
    /// <summary>Tokens to generate before EOS or stop tokens may end the request.</summary>
    public int MinTokens { get; init; }
    /// <summary>Strings that end generation; the matched string is not included in the text unless <see cref="IncludeStopStrInOutput"/>.</summary>
    public IReadOnlyList<string> Stop { get; init; } = [];
    /// <summary>
    /// Words that must not be generated (vLLM's <c>bad_words</c>): each is tokenized as it stands and with a leading
    /// space; a one-token form is never sampled, and the last token of a longer form is masked whenever the output
    /// ends with the tokens before it. Needs the model's tokenizer.
    /// </summary>
    public IReadOnlyList<string> BadWords { get; init; } = [];
    /// <summary>
    /// Keep only the last k prompt tokens (vLLM's <c>truncate_prompt_tokens</c>, a left truncation for prompts that may
    /// outgrow the context); -1 keeps as many as the context holds with room for <see cref="MaxTokens"/>. Null: the
    /// whole prompt, which must fit.
    /// </summary>
    public int? TruncatePromptTokens { get; init; }
    /// <summary>Keep the stop string, stop token or EOS that ended the text at its end (vLLM's <c>include_stop_str_in_output</c>).</summary>
    public bool IncludeStopStrInOutput { get; init; }
    /// <summary>
    /// Only these token ids may be generated (vLLM's <c>allowed_token_ids</c>): every other logit is masked before the
    /// bias, the penalties and sampling. Null: any token.
    /// </summary>
    public IReadOnlyList<int>? AllowedTokenIds { get; init; }
    /// <summary>Token ids that end generation (besides EOS); like EOS, the token is in the output's ids but not in its text unless <see cref="IncludeStopStrInOutput"/>.</summary>
    public IReadOnlyList<int> StopTokenIds { get; init; } = [];
    /// <summary>
    /// Added to the logits of these token ids before sampling (OpenAI's and vLLM's <c>logit_bias</c>): each in
    /// [-100, 100]; -100 all but bans a token, 100 all but forces it.
    /// </summary>
    public IReadOnlyDictionary<int, float>? LogitBias { get; init; }
    /// <summary>Keep generating past EOS.</summary>
    public bool IgnoreEos { get; init; }
    /// <summary>Return the top-k log-probabilities of each generated token (plus the sampled one).</summary>
    public int? Logprobs { get; init; }
    /// <summary>
    /// Return the top-k log-probabilities at every prompt position after the first. Such a request does not read the
    /// prefix cache (every prompt position must be computed to have its logits), so it prefills its whole prompt.
    /// </summary>
    public int? PromptLogprobs { get; init; }
    /// <summary>
    /// A custom stop condition, called with the text generated so far after each token (needs a tokenizer); returning
    /// true ends the request with finish reason "stop". An exception thrown here fails this request only.
    /// </summary>
    public Func<string, bool>? StopCondition { get; init; }
    /// <summary>
    /// A constraint on the output (JSON Schema, any JSON object, regex, choice or grammar): tokens that cannot continue
    /// a match are masked before sampling, and EOS is allowed only where the match is complete. Null: unconstrained.
    /// </summary>
    public StructuredOutputs? StructuredOutputs { get; init; }
    /// <summary>
    /// The request's place in line when the engine schedules by priority (vLLM's request <c>priority</c>, with
    /// <see cref="EngineOptions.SchedulingPolicy"/> <c>"priority"</c>): lower values are admitted first and preempted
    /// last; equal values go by arrival. Must stay 0 under first-come-first-served scheduling.
    /// </summary>
    public int Priority { get; init; }
    /// <summary>
    /// Keeps this request's prompt blocks apart in the prefix cache (vLLM's <c>cache_salt</c>): only requests with the same
    /// salt share cached blocks, so one tenant's cache hits (and their timing) never reveal another's prompts. Null: the
    /// shared cache.
    /// </summary>
    public string? CacheSalt { get; init; }
    /// <summary>Leave special tokens out of the returned text.</summary>
    public bool SkipSpecialTokens { get; init; } = true;

    /// <summary>What each output carries: everything so far (default), only what is new, or one final output.</summary>
    public RequestOutputKind OutputKind { get; init; } = RequestOutputKind.Cumulative;

    /// <summary>Whether this request is greedy.</summary>
    public bool IsGreedy => Temperature == 0f;
}
